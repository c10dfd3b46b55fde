"""Coordination between the workers of one study: an exact cap, distinct points, dead workers, a failure budget.

Every worker asks under one study lock (sweep/storage.py) and suggests the trial's params before it lets
go, so samplers see every running point. A worker registers once (a serial number from the storage) and
seeds its sampler from the study and that serial, so parallel and restarted workers draw different points.

A running trial carries its worker (`host:pid`, and the launcher's slot) and a heartbeat as system
attributes (Optuna's dashboard shows user attributes; these are bookkeeping). Before each ask, a worker
fails the RUNNING trials whose worker process is gone (same host) or whose heartbeat is older than
`heartbeat.grace`, and queues a re-run with the same params (at most `heartbeat.max_retry` times); the
re-run takes its completed rounds from the round cache.

Failed trials carry `fail_reason` and `fail_kind` (error | worker died | interrupted | preempted). When
`sweep.max_failures` trials of this run fail with an error, the study is marked stopped and every worker ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .params import point, space_size, suggest
from .storage import study_lock

log = logging.getLogger(__name__)
HOST = socket.gethostname()


def set_attr(study, trial_id: int, key: str, value) -> None:
    study._storage.set_trial_system_attr(trial_id, key, value)


def study_attrs(study) -> dict:
    return study._storage.get_study_system_attrs(study._study_id)


@dataclass
class Worker:
    """One worker process's view of the study."""
    study: optuna.Study
    url: str
    study_dir: Path
    scfg: object
    space: dict
    cap: int
    slot: str | None = None                   # the launcher's id for this worker (survives a requeue)
    name: str = field(default_factory=lambda: f"{HOST}:{os.getpid()}")
    serial: int = 0
    start: int = 0                            # trials in the study when this worker started

    def lock(self):
        return study_lock(self.url, self.study_dir, self.scfg.study)


def register(worker: Worker) -> int:
    """Take a serial number; fail this slot's trials left RUNNING by a requeued predecessor.
    Returns the sampler seed: a function of the study, `sweep.sampler.seed` and the serial."""
    study = worker.study
    with worker.lock():
        worker.serial = int(study_attrs(study).get("workers_started", 0))
        study._storage.set_study_system_attr(study._study_id, "workers_started", worker.serial + 1)
        trials = study.get_trials(deepcopy=False)
        worker.start = len(trials)
        if worker.slot is not None:
            for t in trials:
                if t.state == TrialState.RUNNING and t.system_attrs.get("slot") == worker.slot:
                    fail_trial(study, t, "its worker was requeued", "preempted", int(worker.scfg.heartbeat.max_retry))
    seed = zlib.crc32(f"{worker.scfg.study}:{worker.scfg.sampler.seed}:{worker.serial}".encode())
    log.info("worker %s (#%d) on study %s; sampler seed %d", worker.name, worker.serial, worker.scfg.study, seed)
    return seed


class Heartbeat:
    """Stamps `worker`, `slot` and `heartbeat` on a running trial, the heartbeat every `interval` seconds."""

    def __init__(self, worker: Worker, trial, interval: float):
        self.study, self.trial_id, self.interval = worker.study, trial._trial_id, interval
        self.stop = threading.Event()
        set_attr(self.study, self.trial_id, "worker", worker.name)
        if worker.slot is not None:
            set_attr(self.study, self.trial_id, "slot", worker.slot)
        self.beat()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def beat(self):
        set_attr(self.study, self.trial_id, "heartbeat", time.time())

    def _run(self):
        while not self.stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 — a missed beat is retried next interval
                log.debug("heartbeat failed: %s", e)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _is_stale(trial, grace: float) -> bool:
    attrs = trial.system_attrs
    host, _, pid = str(attrs.get("worker", "")).partition(":")
    if host == HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True                      # its worker on this host is gone
        except PermissionError:
            pass
    beat = attrs.get("heartbeat")
    last = beat if beat is not None else trial.datetime_start.timestamp()
    return time.time() - last > grace


def retry(study, trial, max_retry: int) -> bool:
    """Queue a re-run of `trial` with its params (at most `max_retry` re-runs of one original trial)."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > max_retry:
        log.warning("trial %d: not re-run (already re-run %d times)", trial.number, max_retry)
        return False
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=trial.params,
                                        distributions=trial.distributions,
                                        system_attrs={"failed_trial": history[0], "retry_history": history}))
    return True


def fail_trial(study, trial, reason: str, kind: str = "error", max_retry: int | None = None) -> bool:
    """Mark `trial` FAIL with a reason; queue a re-run when `max_retry` is given. False if it had finished."""
    try:
        set_attr(study, trial._trial_id, "fail_reason", reason)
        set_attr(study, trial._trial_id, "fail_kind", kind)
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    if max_retry is not None:
        retry(study, study._storage.get_trial(trial._trial_id), max_retry)
    return True


def fail_stale_trials(study, grace: float, max_retry: int) -> list[int]:
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(t, grace) and fail_trial(study, t, "worker died (stale heartbeat)", "worker died", max_retry):
            log.warning("trial %d: its worker died; failed it and queued a re-run", t.number)
            failed.append(t.number)
    return failed


def _stop_reason(worker: Worker, trials) -> str | None:
    """Why this run must stop: another worker stopped it, or the failure budget is spent."""
    stopped = study_attrs(worker.study).get("stopped")
    if stopped and int(stopped["at"]) > worker.start:
        return stopped["reason"]
    failures = [t for t in trials if t.state == TrialState.FAIL and t.number >= worker.start
                and t.system_attrs.get("fail_kind", "error") == "error"]
    budget = int(worker.scfg.max_failures)
    if len(failures) < budget:
        return None
    last = max(failures, key=lambda t: t.number)
    reason = (f"{len(failures)} trials failed (sweep.max_failures={budget}); the last, trial {last.number}: "
              f"{last.system_attrs.get('fail_reason', 'unknown')}")
    worker.study._storage.set_study_system_attr(worker.study._study_id, "stopped",
                                                {"reason": reason, "at": len(trials)})
    return reason


def next_trial(worker: Worker):
    """Under the lock: ("done" | "stopped", reason), None (wait for running trials), or (trial, params)."""
    scfg, study = worker.scfg, worker.study
    with worker.lock():
        fail_stale_trials(study, float(scfg.heartbeat.grace), int(scfg.heartbeat.max_retry))
        trials = study.get_trials(deepcopy=False)
        reason = _stop_reason(worker, trials)
        if reason:
            return "stopped", reason
        count = {s: 0 for s in TrialState}
        for t in trials:
            count[t.state] += 1
        done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
        if done >= worker.cap:
            return "done", f"{done} trials finished (cap {worker.cap})"
        if not count[TrialState.WAITING]:
            if done + count[TrialState.RUNNING] >= worker.cap:
                return None
            if _exhausted(worker, trials):
                if count[TrialState.RUNNING]:
                    return None
                return "done", "every point of the search space has been tried"
        trial = study.ask()
        params = {key: suggest(trial, key, spec) for key, spec in worker.space.items()}
        return trial, params


def _exhausted(worker: Worker, trials) -> bool:
    """No new point is left (repeats off): every point of a finite space is held by some trial."""
    if worker.scfg.get("allow_repeats", False):
        return False
    keys = set(worker.space)
    points = {point(t.params) for t in trials if set(t.params) == keys}
    return len(points) >= space_size(worker.space)
