"""How `sweep.workers` workers start (`sweep.launcher`).

- `local`: the main process starts `workers − 1` worker processes on this host and works itself. Each
  process gets `cores // workers` torch threads (oversubscribed threads spin-wait); `sweep.workers=auto` is
  one single-threaded worker per core, up to the trial cap, on CPU (measured faster than one worker using
  every core: benchmarks/RESULTS.md), and one worker on a GPU.
- `submitit`: `workers` jobs as one submitit job array (`sweep.submitit.cluster`: slurm, or local for a
  test), each a worker on the shared storage; the main process only waits and writes the summary. On
  preemption or timeout submitit checkpoints and requeues a job: the worker fails its running trial
  (`preempted`), queues its re-run, and the restarted job takes it from the storage, its completed rounds
  from the round cache (`<sweep.dir>/cache`, on the shared filesystem).

Workers never see a secret on their command line or in a pickle: the storage URL travels in the
environment (`$CRABSWEEP_STORAGE`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from optuna.trial import TrialState
from tqdm.auto import tqdm

from ..errors import UserError
from ..registry import Registry
from .storage import ENV, worker_env

log = logging.getLogger(__name__)

LAUNCHERS = Registry("launcher", key="sweep.launcher")


def launch(plan, run_worker) -> None:
    LAUNCHERS.get(plan.scfg.launcher).obj(plan, run_worker)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                 # not on Linux
        return os.cpu_count() or 1


def n_workers(scfg, cap: int, device: str = "cpu") -> int:
    """`sweep.workers` as a number: `auto` → one worker per core (at most `cap`) on CPU, one on a GPU."""
    if scfg.workers != "auto":
        return int(scfg.workers)
    if scfg.launcher != "local" or device != "cpu":
        return 1
    return max(1, min(cores(), cap))


def threads_per_worker(workers: int) -> int:
    """The cores shared out between this host's workers (an explicit OMP_NUM_THREADS wins)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, cores() // workers)


def worker_command(plan) -> list[str]:
    config_dir = ["--config-dir", str(plan.config_dir)] if plan.config_dir else []
    return [sys.executable, "-m", "crabsweep.cli", "sweep", *config_dir, *plan.public, "sweep.role=worker"]


@LAUNCHERS.register("local")
def local(plan, run_worker) -> None:
    import torch
    threads = threads_per_worker(plan.workers)
    env = {**worker_env(plan.url), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen(worker_command(plan), env=env) for _ in range(plan.workers - 1)]
    torch.set_num_threads(threads)
    if plan.workers > 1:
        log.info("%d local workers × %d torch thread%s", plan.workers, threads, "s" * (threads > 1))
    try:
        run_worker(plan)
    except BaseException:                 # Ctrl-C (or a crash) here: the workers stop too, each failing its trial
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        raise
    finally:
        for p in procs:
            p.wait()


# --------------------------------------------------------------------------------------------------
# submitit
# --------------------------------------------------------------------------------------------------
def _checkpointable():
    try:
        import submitit
    except ImportError as e:
        raise UserError("sweep.launcher=submitit needs submitit; pip install 'crabsweep[slurm]'") from e
    return submitit


class SweepWorker:
    """The job of one submitit worker (importable, so it is pickled by reference; its args hold no secret)."""

    def __call__(self, overrides: list[str], config_dir: str | None, index: int) -> str:
        import submitit
        from ..config import compose_config
        from ..console import setup_logging
        from .study import run_sweep
        setup_logging(None)
        cfg, _ = compose_config("sweep", [*overrides, "sweep.role=worker"], config_dir)
        slot = f"submitit:{submitit.JobEnvironment().job_id}"           # the same after a requeue
        run_sweep(cfg, [*overrides, "sweep.role=worker"], config_dir, slot=slot)
        return f"worker {index} done"

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on preemption/timeout: requeue the same job (the storage holds the state)."""
        import submitit
        return submitit.helpers.DelayedSubmission(SweepWorker(), *args, **kwargs)


@LAUNCHERS.register("submitit")
def submitit_array(plan, run_worker) -> None:
    submitit = _checkpointable()
    s, n = plan.scfg.submitit, plan.workers
    folder = plan.study_dir / "submitit" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o700)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=s.cluster,
                                     slurm_max_num_timeout=int(s.max_requeues), local_max_num_timeout=int(s.max_requeues))
    params = {"timeout_min": int(s.timeout_min), "name": f"crabsweep-{plan.scfg.study}",
              "cpus_per_task": int(s.cpus_per_task)}
    if s.cluster == "slurm":
        params.update(slurm_array_parallelism=int(s.array_parallelism or n),
                      slurm_additional_parameters=dict(s.additional or {}))
        for key in ("partition", "mem_gb", "gpus_per_node"):
            if s.get(key) is not None:
                params[key if key != "partition" else "slurm_partition"] = s[key]
    executor.update_parameters(**params)
    with submitit.helpers.environment_variables(**{ENV: plan.url}):
        jobs = executor.map_array(SweepWorker(), [plan.public] * n, [plan.config_dir] * n, list(range(n)))
    log.info("submitted %d workers as submitit jobs %s (%s); logs in %s", n, [j.job_id for j in jobs],
             s.cluster, folder)
    _wait(plan, jobs, float(s.poll_seconds))
    failed = [(j, j.exception()) for j in jobs if j.exception() is not None]
    for job, exc in failed:
        log.error("worker job %s failed: %s", job.job_id, str(exc).strip().splitlines()[-1] if str(exc) else exc)
    if failed and len(failed) == len(jobs):
        raise UserError(f"every worker job failed; see the logs in {folder}")


def _wait(plan, jobs, poll: float) -> None:
    """Until every job ended: a progress bar over the study's finished trials (the storage is the truth)."""
    from .study import open_study
    study = open_study(plan)
    bar = tqdm(total=plan.cap, desc="trials", disable=None)
    while not all(j.done() for j in jobs):
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        bar.update(min(finished, bar.total) - bar.n)
        time.sleep(poll)
    bar.close()

