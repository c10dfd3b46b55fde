"""`sweep.launcher=submitit`: workers as a submitit job array on submitit's local executor and on a one-node
SLURM cluster (scripts/slurm.sh), an exact cap with distinct params, and a preempted worker that is requeued."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from crabsweep.cli import main
from crabsweep.sweep.storage import open_recorded_study

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "sweep.pruner.name=none",
        "chain.rounds=1", "chain.control=none", "train.epochs=1", "sweep.objective.metric=final_gap",
        "sweep.heartbeat.interval=1", "sweep.launcher=submitit", "sweep.submitit.poll_seconds=1",
        "sweep.submitit.cpus_per_task=1", "sweep.submitit.timeout_min=30"]


def _slurm_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node SLURM cluster of scripts/slurm.sh (started here if it is not up; stopped if we started it)."""
    started = False
    if not _slurm_up() and os.geteuid() == 0:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh")], capture_output=True, timeout=600)
        started = _slurm_up()
    if not _slurm_up():
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster: scripts/slurm.sh (run by scripts/setup.sh --test) should have started one")
        pytest.skip("no SLURM cluster (run scripts/slurm.sh as root)")
    yield
    if started:
        subprocess.run(["bash", str(ROOT / "scripts" / "slurm.sh"), "stop"], capture_output=True, timeout=120)


def _check_exact_cap(study_dir: Path, n: int) -> list:
    trials = open_recorded_study(study_dir)[1].get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n and len(trials) == n, [(t.number, t.state) for t in trials]
    assert len({t.params["k.k"] for t in complete}) == n                      # distinct params
    assert len({t.system_attrs["slot"] for t in complete}) == 2               # both jobs worked
    (folder,) = (study_dir / "submitit").iterdir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    return trials


@pytest.mark.parametrize("cluster", ["local", "slurm"])
def test_submitit_workers_reach_an_exact_cap_with_distinct_params(tmp_path, cluster, request):
    if cluster == "slurm":
        request.getfixturevalue("slurm_cluster")
    assert main(["sweep", *FAST, f"sweep.submitit.cluster={cluster}", f"sweep.dir={tmp_path}", "sweep.study=sub",
                 "sweep.workers=2", "sweep.n_trials=4", "sweep.sampler.name=tpe",
                 "sweep.params={k.k: [1, 2, 3, 4, 5, 6, 7, 8]}"]) == 0
    _check_exact_cap(tmp_path / "sub", 4)


def test_a_preempted_worker_is_requeued_and_its_trial_rerun(tmp_path):
    """SIGUSR2 to a worker (what SLURM sends on preemption): submitit checkpoints and requeues the job; the
    trial is failed as `preempted` and re-run; the study still ends at exactly its cap."""
    study_dir = tmp_path / "pre"
    args = [*FAST, "train.epochs=15", "sweep.submitit.cluster=local", f"sweep.dir={tmp_path}",
            "sweep.study=pre", "sweep.workers=2", "sweep.n_trials=3", "sweep.params={k.k: [1, 2, 3, 4, 5, 6]}"]
    driver = subprocess.Popen([sys.executable, "-m", "crabsweep.cli", "sweep", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = None
    deadline = time.time() + 300
    while victim is None and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if not (study_dir / "sweep.json").exists():
            continue
        running = [t for t in open_recorded_study(study_dir)[1].get_trials()
                   if t.state == TrialState.RUNNING and "slot" in t.system_attrs
                   and (study_dir / t.system_attrs.get("run_dir", "-") / "round_0").exists()]
        if running:
            victim = running[0]
            os.kill(int(victim.system_attrs["worker"].rsplit(":", 1)[1]), signal.SIGUSR2)
    assert victim is not None, "no running trial to preempt"
    _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, err[-3000:]
    trials = open_recorded_study(study_dir)[1].get_trials()
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL and failed.system_attrs["fail_kind"] == "preempted"
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE and rerun[0].params == victim.params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert len({tuple(t.params.items()) for t in trials if t.state == TrialState.COMPLETE}) == 3
    logs = "".join(p.read_text() for p in (study_dir / "submitit").rglob("*_log.*"))   # submitit's own lines
    assert "this job is preempted" in logs and "Requeued job" in logs
