"""Sweeps whose records cannot mix and that stop: studies sharing a sweep.dir, the run-dir check, the failure
budget, non-finite objectives, a corrupt cache entry, Ctrl-C — real chains on the tiny model."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

from optuna.trial import TrialState

from crabsweep.cli import main
from crabsweep.io import read_json
from crabsweep.sweep.storage import open_recorded_study

FAST = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "sweep.pruner.name=none",
        "chain.rounds=1", "chain.control=none", "train.epochs=1", "sweep.objective.metric=final_gap",
        "sweep.objective.direction=maximize", "sweep.heartbeat.interval=1"]


def _trials(study_dir: Path):
    return open_recorded_study(study_dir)[1].get_trials()


def _chain(study_dir: Path, trial) -> dict:
    return read_json(study_dir / trial.system_attrs["run_dir"] / "chain.json")


def test_two_studies_in_one_sweep_dir_never_mix(tmp_path):
    """A streamed study first, a post-hoc one second: separate trial folders; the shared cache serves the
    post-hoc study the streamed study's round 0, and it computes its own scores on it."""
    root = tmp_path / "sweeps"
    for name, method, n in (("streamed", "grad_x_act", 1), ("posthoc", "integrated_gradients", 2)):
        extra = ["attribution.n_steps=4"] if method == "integrated_gradients" else []
        assert main(["sweep", *FAST, f"sweep.dir={root}", f"sweep.study={name}", f"sweep.n_trials={n}",
                     "sweep.params={k.k: [3, 4]}", "sweep.sampler.name=grid", f"attribution={method}", *extra]) == 0
    for name, method, n in (("streamed", "grad_x_act", 1), ("posthoc", "integrated_gradients", 2)):
        trials = _trials(root / name)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n
        for trial in trials:
            chain = _chain(root / name, trial)
            assert chain["config"]["attribution"] == method
            assert [r["recruits"]["method"] for r in chain["rounds"]] == [method, method]
            assert all(method in r["recruits"]["top"] for r in chain["rounds"])
    streamed = read_json(root / "streamed" / "trial_0" / "round_0" / "record.json")
    for trial in ("trial_0", "trial_1"):        # round 0 came from the other study, also after post-hoc scores joined it
        posthoc = read_json(root / "posthoc" / trial / "round_0" / "record.json")
        assert posthoc["timing"]["cache"] == "hit"
        assert posthoc["metrics"]["final_loss"] == streamed["metrics"]["final_loss"]
    assert not (root / "cache" / ".corrupt").exists()
    assert sorted(p.name for p in root.iterdir()) == ["cache", "posthoc", "streamed"]


def test_a_trial_never_resumes_into_a_folder_made_with_another_config(tmp_path, capsys):
    """A study restarted on a fresh storage meets its old trial_0 folder: the run-dir check refuses it, the
    trial fails with that reason, and max_failures stops the sweep (exit 2) — the old chain is untouched."""
    args = [*FAST, f"sweep.dir={tmp_path}", "sweep.study=s", "sweep.n_trials=1"]
    assert main(["sweep", *args, "sweep.params={attribution: [grad_norm], k.k: [3]}"]) == 0
    chain_before = (tmp_path / "s" / "trial_0" / "chain.json").read_bytes()
    (tmp_path / "s" / "study.db").unlink()                                       # a fresh storage, same name
    capsys.readouterr()
    code = main(["sweep", *args, "sweep.params={attribution: [grad_x_act], k.k: [4]}", "sweep.max_failures=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("crabsweep: error: sweep stopped: 1 trials failed (sweep.max_failures=1)")
    assert "holds a different config" in err[-1]
    (trial,) = _trials(tmp_path / "s")
    assert trial.state == TrialState.FAIL and "holds a different config" in trial.system_attrs["fail_reason"]
    assert trial.system_attrs["fail_kind"] == "error"
    assert (tmp_path / "s" / "trial_0" / "chain.json").read_bytes() == chain_before
    assert read_json(tmp_path / "s" / "summary.json")["stopped"].startswith("1 trials failed")


def test_failing_trials_stop_the_sweep_at_the_budget(tmp_path, capsys):
    """Every trial fails deterministically (K larger than the model's units): 2 FAIL trials, then a stop;
    no trial folder is left behind."""
    code = main(["sweep", *FAST, f"sweep.dir={tmp_path}", "sweep.study=f", "sweep.n_trials=6", "sweep.max_failures=2",
                 "sweep.params={k.k: [1000, 2000, 3000, 4000]}"])
    assert code == 2
    trials = _trials(tmp_path / "f")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.system_attrs["fail_reason"] for t in trials)
    assert not list((tmp_path / "f").glob("trial_*"))


def test_a_non_finite_objective_is_a_failure_with_a_reason(tmp_path, monkeypatch):
    import crabsweep.sweep.study as study_module
    real = study_module._run_chain

    def nan_chain(*args, **kwargs):
        chain = real(*args, **kwargs)
        chain["rounds"][-1]["metrics"]["final_gap"] = math.nan
        return chain

    monkeypatch.setattr(study_module, "_run_chain", nan_chain)
    assert main(["sweep", *FAST, f"sweep.dir={tmp_path}", "sweep.study=n", "sweep.n_trials=1",
                 "sweep.params={k.k: [3]}"]) == 0
    (trial,) = _trials(tmp_path / "n")
    assert trial.state == TrialState.FAIL and trial.system_attrs["fail_reason"] == "objective final_gap is nan in round 1"


def test_a_corrupt_cache_entry_is_moved_aside_and_recomputed(tmp_path):
    args = [*FAST, f"sweep.dir={tmp_path}", "sweep.study=c", "sweep.params={k.k: [3, 4]}"]
    assert main(["sweep", *args, "sweep.n_trials=1"]) == 0
    entries = [p for p in (tmp_path / "cache").iterdir() if (p / "record.json").exists()]   # rounds, not units/
    assert len(entries) == 2                                                    # rounds 0 and 1
    round0 = next(p for p in entries if read_json(p / "record.json")["round"] == 0)
    scores = round0 / "scores.safetensors"
    scores.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])      # truncated
    assert main(["sweep", *args, "sweep.n_trials=2"]) == 0                      # the 2nd trial shares round 0
    trials = _trials(tmp_path / "c")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert read_json(tmp_path / "c" / "trial_1" / "round_0" / "record.json")["timing"].get("cache") is None
    (aside,) = (tmp_path / "cache" / ".corrupt").iterdir()
    assert aside.name.startswith(round0.name)
    assert (round0 / "manifest.json").exists()                                  # recomputed and stored again


def test_ctrl_c_fails_the_running_trial_as_interrupted_and_the_next_run_reruns_it(tmp_path):
    args = [*FAST, "train.epochs=40", f"sweep.dir={tmp_path}", "sweep.study=i", "sweep.n_trials=1",
            "sweep.params={k.k: [3]}"]
    proc = subprocess.Popen([sys.executable, "-m", "crabsweep.cli", "sweep", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "i" / "trial_0" / "round_0" / "record.json"
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "crabsweep: interrupted"
    trials = _trials(tmp_path / "i")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].system_attrs["fail_reason"] == "interrupted"
    assert trials[0].system_attrs["fail_kind"] == "interrupted"
    assert main(["sweep", *args]) == 0                                          # the re-run, from the cache
    trials = _trials(tmp_path / "i")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
    assert read_json(tmp_path / "i" / "trial_1" / "round_0" / "record.json")["timing"]["cache"] == "hit"
