"""The sweep on tiny models: workers on shared storages, dead workers, resume, pruning, W&B records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from crabsweep.cli import main
from crabsweep.io import read_json
from crabsweep.sweep.storage import open_recorded_study

PG_URL = "postgresql://crabsweep:crabsweep@127.0.0.1:5432/crabsweep_test"
BASE = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "sweep.pruner.name=none",
        "sweep.heartbeat.interval=1", "sweep.heartbeat.grace=30"]


def _study(study_dir: Path) -> optuna.Study:
    return open_recorded_study(study_dir)[1]


def _run_dir(study_dir: Path, trial) -> Path:
    return study_dir / trial.system_attrs["run_dir"]               # recorded relative to the study folder


def _pg_available() -> bool:
    try:
        import sqlalchemy
        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001
        return False


STORAGES = ["sqlite", "journal", "postgresql"]


@pytest.mark.parametrize("storage", STORAGES)
def test_two_workers_share_a_storage_and_stop_at_the_cap(tmp_path, storage):
    if storage == "postgresql":
        if not _pg_available():
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL at {PG_URL} is not reachable; scripts/postgres.sh should have started it")
            pytest.skip("no PostgreSQL on loopback (run scripts/postgres.sh as root)")
        storage = PG_URL
    name = f"s-{uuid.uuid4().hex[:8]}"
    study_dir = tmp_path / "sweeps" / name
    args = [*BASE, "sweep.sampler.name=grid", f"sweep.dir={tmp_path / 'sweeps'}", f"sweep.study={name}",
            "sweep.n_trials=6", "sweep.workers=2", f"sweep.storage={storage}", "train.epochs=12"]
    assert main(["sweep", *args]) == 0
    trials = _study(study_dir).get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    params = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(params)) == 6                                   # no trial ran twice
    assert {t.system_attrs["run_dir"] for t in trials} == {f"trial_{t.number}" for t in trials}
    assert len({t.system_attrs["worker"] for t in trials}) == 2    # both workers took trials
    assert all(set(t.user_attrs) == {"trajectory", "rounds_completed"} for t in trials)   # bookkeeping is system
    for t in trials:
        chain = read_json(_run_dir(study_dir, t) / "chain.json")
        assert len(chain["rounds"]) == 3 and chain["config"]["attribution"] == t.params["attribution"]
    summary = read_json(study_dir / "summary.json")
    # round 0 does not depend on attribution or K: trained once, before the workers start, then read by all six
    assert summary["states"] == {"COMPLETE": 6} and summary["cache"]["hits"] >= 6
    assert all(t.system_attrs["cache_hits"] >= 1 for t in trials)


def test_killed_worker_trial_fails_and_is_rerun_from_the_cache(tmp_path):
    study_dir = tmp_path / "kill"
    args = [*BASE, f"sweep.dir={tmp_path}", "sweep.study=kill", "sweep.n_trials=1", "train.epochs=40"]
    worker = subprocess.Popen([sys.executable, "-m", "crabsweep.cli", "sweep", *args, "sweep.role=worker"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = study_dir / "trial_0" / "round_1" / "record.json"
    deadline = time.time() + 180
    while not marker.exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), "the worker never finished round 1"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert not (study_dir / "trial_0" / "chain.json").exists()     # killed mid-chain

    assert main(["sweep", *args]) == 0
    trials = _study(study_dir).get_trials()
    dead = trials[0]
    assert dead.state == TrialState.FAIL and dead.system_attrs["fail_reason"].startswith("worker died")
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE and rerun[0].params == dead.params
    assert rerun[0].system_attrs["cache_hits"] >= 2                 # rounds 0 and 1 were not retrained
    hits = [r["timing"].get("cache") for r in (read_json(_run_dir(study_dir, rerun[0]) / f"round_{i}" / "record.json")
                                                for i in range(3))]
    assert hits[:2] == ["hit", "hit"] and hits[2] is None


def test_same_study_name_resumes(tmp_path):
    study_dir = tmp_path / "resume"
    args = [*BASE, f"sweep.dir={tmp_path}", "sweep.study=resume", "chain.rounds=1"]
    assert main(["sweep", *args, "sweep.n_trials=2"]) == 0
    first = {t.number: t.datetime_complete for t in _study(study_dir).get_trials()}
    for t in _study(study_dir).get_trials():     # chain.rounds=1 on the command line beats sweep.overrides' 2
        assert len(read_json(_run_dir(study_dir, t) / "chain.json")["rounds"]) == 2
    assert main(["sweep", *args, "sweep.n_trials=2"]) == 0          # cap reached: nothing new
    assert len(_study(study_dir).get_trials()) == 2
    assert main(["sweep", *args, "sweep.n_trials=3"]) == 0
    trials = _study(study_dir).get_trials()
    assert len(trials) == 3 and {t.number: t.datetime_complete for t in trials[:2]} == first
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 3         # the restart took a new point


def test_pruned_chain_keeps_its_completed_rounds(tmp_path):
    study_dir = tmp_path / "prune"
    args = [*BASE, f"sweep.dir={tmp_path}", "sweep.study=prune", "sweep.n_trials=1", "sweep.pruner.name=threshold",
            "+sweep.pruner.lower=1e9", "sweep.pruner.n_warmup_steps=1", "sweep.objective.metric=final_gap"]
    assert main(["sweep", *args]) == 0
    (trial,) = _study(study_dir).get_trials()
    assert trial.state == TrialState.PRUNED and sorted(trial.intermediate_values) == [0, 1]
    run = _run_dir(study_dir, trial)
    assert [p.name for p in sorted(run.glob("round_*"))] == ["round_0", "round_1"]
    chain = read_json(run / "chain.json")
    assert chain["stopped"].startswith("pruned by the threshold pruner after round 1")
    assert "PRUNED" in (study_dir / "report.md").read_text()


def test_wandb_offline_run_records_group_config_rounds_and_recruits(tmp_path):
    study_dir = tmp_path / "wb"
    args = [*BASE[:3], "tracker=wandb_offline", *BASE[4:], f"sweep.dir={tmp_path}", "sweep.study=wb",
            "sweep.n_trials=1", "sweep.params={attribution: [grad_x_act], k.k: [3]}"]
    assert main(["sweep", *args]) == 0
    (trial,) = _study(study_dir).get_trials()
    chain = read_json(_run_dir(study_dir, trial) / "chain.json")
    runs = sorted((study_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2                                           # the chain and the study summary
    records = {}
    for run in runs:
        out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run)],
                             capture_output=True, text=True, check=True).stdout
        lines = [json.loads(x) for x in out.splitlines() if x.strip()]
        meta = next(x["run"] for x in lines if x.get("type") == "run")
        records[meta["job_type"]] = (run, meta, [x["history"]["item"] for x in lines if x.get("type") == "history"])
    run, meta, history = records["chain"]
    assert meta["run_group"] == "wb" and records["summary"][1]["run_group"] == "wb"
    config = meta["config"]["update"]
    assert config["trial_params"] == {"attribution": "grad_x_act", "k.k": 3}
    assert config["k"] == {"k": 3, "policy": "fixed", "cap": None}
    assert config["attribution"] == {"name": "grad_x_act", "normalize": "none"}
    per_round = {h["round"]: h for h in history if "round" in h}
    assert sorted(per_round) == [0, 1, 2]
    for rec in chain["rounds"]:
        m = per_round[rec["round"]]
        assert m["round/final_gap"] == pytest.approx(rec["metrics"]["final_gap"])
        assert m["round/heldout_loss"] == pytest.approx(rec["metrics"]["heldout_loss"])
    assert sum("train/loss" in h for h in history) == sum(len(read_json(
        _run_dir(study_dir, trial) / f"round_{r}" / "record.json")["loss_curve"]) for r in range(3))
    table_path = next(h["recruits.path"] for h in history if "recruits.path" in h)
    table = json.loads((run / "files" / table_path).read_text())
    assert table["columns"] == ["round", "layer", "index", "score", "method", "selected", "rank", "top", "unit"]
    selected = [(row[0], row[1], row[2]) for row in table["data"] if row[5] and row[4] == "grad_x_act"]
    expected = [(rec["round"], x["unit"]["layer"], x["unit"]["index"]) for rec in chain["rounds"]
                for x in rec["recruits"]["selected"]]
    assert selected == expected
