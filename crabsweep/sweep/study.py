"""`crabsweep sweep`: an Optuna ask/tell loop whose trials are whole Crab Step chains.

Each trial's parameters become Hydra overrides composed into a frozen chain config
(`multirun/<study>/trial_<n>/`). Every finished round reports the objective metric as an
intermediate value, so the pruner can stop unpromising chains (recorded PRUNED with their rounds).
Storages: SQLite under the study folder (default), a journal file, or any RDB URL (PostgreSQL for
many hosts). Workers — `sweep.workers=N` local processes, or the same command on several hosts —
share the storage; a lock makes the global trial cap exact, and a heartbeat (one mechanism for all
storages: Optuna 5's JournalStorage has none of its own) lets live workers fail and re-run the
trials of dead ones, whose completed rounds then come from the round cache.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .. import io
from ..loop.cache import RoundCache
from ..loop.chain import run_chain
from ..config import compose_config, save_config
from ..errors import UserError
from ..core.session import Session
from ..registry import Registry
from ..track.wandb import make_tracker

log = logging.getLogger(__name__)
HOST = socket.gethostname()


# --------------------------------------------------------------------------------------------------
# Study construction
# --------------------------------------------------------------------------------------------------
def storage_url(scfg, study_dir: Path) -> str:
    if scfg.storage == "sqlite":
        return f"sqlite:///{study_dir.resolve() / 'study.db'}"
    if scfg.storage == "journal":
        return f"journal:{study_dir.resolve() / 'journal.log'}"
    return str(scfg.storage)


def make_storage(url: str):
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage
        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:  # noqa: BLE001 — an unreachable or malformed URL is the user's to fix
        raise UserError(f"cannot open sweep.storage '{url}' ({type(e).__name__}); use sqlite, journal or a "
                        "reachable RDB URL such as postgresql://user:pass@host/db") from e


class GridSampler(optuna.samplers.BruteForceSampler):
    """BruteForceSampler for ask/tell: its `after_trial` calls `study.stop()` once the grid is exhausted,
    which Optuna allows only inside `optimize()`; here the sweep's global cap ends the study."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


SAMPLERS = Registry("sampler", key="sweep.sampler.name")
SAMPLERS.register("tpe")(lambda seed, params: optuna.samplers.TPESampler(seed=seed))
SAMPLERS.register("random")(lambda seed, params: optuna.samplers.RandomSampler(seed=seed))
SAMPLERS.register("bruteforce")(lambda seed, params: GridSampler(seed=seed))


@SAMPLERS.register("cmaes")
def _cmaes(seed, params):
    if any(spec["type"] == "categorical" for spec in params.values()):
        raise UserError("sweep.sampler=cmaes needs a numeric search space (int/float params only); "
                        "use tpe, random or bruteforce for categorical params")
    return optuna.samplers.CmaEsSampler(seed=seed)


def make_sampler(scfg, params: dict):
    return SAMPLERS.get(scfg.sampler.name).obj(scfg.sampler.get("seed", 0), params)


PRUNERS = Registry("pruner", key="sweep.pruner.name")
PRUNERS.register("median")(lambda p, rounds: optuna.pruners.MedianPruner(
    n_startup_trials=p.get("n_startup_trials", 2), n_warmup_steps=p.get("n_warmup_steps", 1)))
PRUNERS.register("percentile")(lambda p, rounds: optuna.pruners.PercentilePruner(
    p.get("percentile", 25.0), n_startup_trials=p.get("n_startup_trials", 2), n_warmup_steps=p.get("n_warmup_steps", 1)))
PRUNERS.register("hyperband")(lambda p, rounds: optuna.pruners.HyperbandPruner(min_resource=1,
                                                                                max_resource=max(rounds, 1)))
PRUNERS.register("threshold")(lambda p, rounds: optuna.pruners.ThresholdPruner(
    lower=p.get("lower"), upper=p.get("upper"), n_warmup_steps=p.get("n_warmup_steps", 0)))
PRUNERS.register("none")(lambda p, rounds: optuna.pruners.NopPruner())


def make_pruner(pcfg, rounds: int):
    return PRUNERS.get(pcfg.name).obj(pcfg, rounds)


def search_space(scfg) -> dict[str, dict]:
    """`params` entries: a list (categorical) or {type: categorical|int|float, choices | low, high, log, step}."""
    space = {}
    for key, spec in OmegaConf.to_container(scfg.params).items():
        spec = {"type": "categorical", "choices": spec} if isinstance(spec, list) else dict(spec)
        if spec.get("type") not in ("categorical", "int", "float"):
            raise UserError(f"sweep.params.{key}: type must be categorical, int or float")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise UserError(f"sweep.params.{key}: a categorical param needs a non-empty choices list")
        if spec["type"] != "categorical" and not ("low" in spec and "high" in spec and spec["low"] <= spec["high"]):
            raise UserError(f"sweep.params.{key}: int/float params need low ≤ high")
        space[key] = spec
    return space


def suggest(trial, key: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1), log=spec.get("log", False))
    return trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))


def open_study(cfg, study_dir: Path) -> optuna.Study:
    scfg = cfg.sweep
    url = storage_url(scfg, study_dir)
    study = optuna.create_study(study_name=scfg.study, storage=make_storage(url),
                                sampler=make_sampler(scfg, search_space(scfg)),
                                pruner=make_pruner(scfg.pruner, int(cfg.chain.rounds)),
                                direction=scfg.objective.direction, load_if_exists=True)
    io.write_json(study_dir / "sweep.json", {"study": scfg.study, "storage": url,
                                             "objective": OmegaConf.to_container(scfg.objective)})
    return study


# --------------------------------------------------------------------------------------------------
# Coordination between workers: an exact cap, and re-running the trials of dead workers
# --------------------------------------------------------------------------------------------------
@contextmanager
def study_lock(url: str, study_dir: Path, name: str):
    """Serialize "count, then ask" across workers: a file lock on one host, an advisory lock in PostgreSQL."""
    if url.startswith("postgresql"):
        import sqlalchemy
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        key = zlib.crc32(f"crabsweep:{name}".encode())
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    study_dir.mkdir(parents=True, exist_ok=True)
    with open(study_dir / ".ask.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Heartbeat:
    """Stamps `heartbeat` (and `worker`) on a running trial every `interval` seconds."""

    def __init__(self, study, trial, interval: float):
        self.storage, self.trial_id, self.interval = study._storage, trial._trial_id, interval
        self.stop = threading.Event()
        self.storage.set_trial_user_attr(self.trial_id, "worker", f"{HOST}:{os.getpid()}")
        self.beat()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def beat(self):
        self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())

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
    host, _, pid = str(trial.user_attrs.get("worker", "")).partition(":")
    if host == HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True                      # its worker on this host is gone
        except PermissionError:
            pass
    beat = trial.user_attrs.get("heartbeat")
    last = beat if beat is not None else trial.datetime_start.timestamp()
    return time.time() - last > grace


def fail_stale_trials(study, grace: float, max_retry: int) -> list[int]:
    """Fail RUNNING trials of dead workers and enqueue a retry of each (same params)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _is_stale(t, grace):
            try:
                study._storage.set_trial_system_attr(t._trial_id, "fail_reason", "worker died (stale heartbeat)")
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            log.warning("trial %d: its worker died; failed it and queued a re-run", t.number)
            retry(study, study._storage.get_trial(t._trial_id))
            failed.append(t.number)
    return failed


def next_trial(study, url: str, study_dir: Path, scfg):
    """Under the lock: 'done' (cap reached), None (wait for running trials), or a new/retried trial."""
    with study_lock(url, study_dir, scfg.study):
        fail_stale_trials(study, float(scfg.heartbeat.grace), int(scfg.heartbeat.max_retry))
        count = {s: 0 for s in TrialState}
        for t in study.get_trials(deepcopy=False):
            count[t.state] += 1
        done = count[TrialState.COMPLETE] + count[TrialState.PRUNED]
        if done >= int(scfg.n_trials):
            return "done"
        if count[TrialState.WAITING] or done + count[TrialState.RUNNING] < int(scfg.n_trials):
            return study.ask()
        return None


# --------------------------------------------------------------------------------------------------
# Trials
# --------------------------------------------------------------------------------------------------
def run_worker(cfg, base_overrides: list[str], study_dir: Path) -> None:
    scfg = cfg.sweep
    study = open_study(cfg, study_dir)
    url = storage_url(scfg, study_dir)
    space = search_space(scfg)
    cache = RoundCache(study_dir / "cache") if scfg.cache else None
    sessions: dict[str, Session] = {}
    bar = tqdm(total=int(scfg.n_trials), desc="trials", disable=None)
    while True:
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        bar.update(min(finished, bar.total) - bar.n)       # counts every worker's trials
        trial = next_trial(study, url, study_dir, scfg)
        if trial == "done":
            bar.close()
            return
        if trial is None:
            time.sleep(float(scfg.heartbeat.interval) / 2)
            continue
        run_trial(study, trial, cfg, base_overrides, study_dir, space, cache, sessions)


def trial_overrides(trial, space: dict) -> tuple[dict, list[str]]:
    params = {key: suggest(trial, key, spec) for key, spec in space.items()}
    return params, [f"{key}={value}" for key, value in params.items()]


def run_trial(study, trial, cfg, base_overrides, study_dir, space, cache, sessions) -> None:
    scfg = cfg.sweep
    params, overrides = trial_overrides(trial, space)
    run_dir = study_dir / f"trial_{trial.number}"
    metric = scfg.objective.metric
    log.info("trial %d: %s", trial.number, " ".join(overrides))
    try:
        tcfg, _ = compose_config("chain", [*base_overrides, *scfg.overrides, *overrides,
                                           f"hydra.run.dir={run_dir}"])
    except UserError as e:
        study.tell(trial, state=TrialState.FAIL)
        log.error("trial %d: %s", trial.number, e)
        return
    save_config(tcfg, [*scfg.overrides, *overrides], run_dir)
    trial.set_user_attr("run_dir", str(run_dir))
    reported: dict[int, float] = {}

    def on_round(rec: dict) -> str | None:
        value = rec["metrics"].get(metric)
        if value is None:
            return None
        reported[rec["round"]] = value
        trial.report(value, step=rec["round"])
        if rec["round"] < int(tcfg.chain.rounds) and trial.should_prune():   # a finished chain is never "pruned"
            return f"pruned by the {scfg.pruner.name} pruner after round {rec['round']}"
        return None

    from ..api import chain_config
    tracker = make_tracker(tcfg, name=f"{scfg.study}-trial{trial.number}", group=scfg.study, job_type="chain",
                           config={**chain_config(tcfg), "trial": trial.number, "trial_params": params},
                           directory=Path(tcfg.tracker.dir or study_dir), adapters_from=run_dir, run_dir=run_dir)
    try:
        with Heartbeat(study, trial, float(scfg.heartbeat.interval)):
            session = _session_for(tcfg, sessions)
            hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
            chain = run_chain(session, run_dir, cache=cache, tracker=tracker, on_round=on_round)
    except Exception as e:  # noqa: BLE001 — one failed chain must not stop the sweep
        log.exception("trial %d failed: %s", trial.number, e)
        tracker.finish(None, state="failed")
        study.tell(trial, state=TrialState.FAIL)
        return
    if cache is not None:
        trial.set_user_attr("cache_hits", cache.hits - hits0)
        trial.set_user_attr("cache_misses", cache.misses - misses0)
    trial.set_user_attr("trajectory", chain["trajectory"]["class"])
    trial.set_user_attr("rounds_completed", len(chain["rounds"]))
    if chain["stopped"] and chain["stopped"].startswith("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
    elif reported:
        study.tell(trial, reported[max(reported)])
    else:
        log.error("trial %d: no round produced metric '%s'", trial.number, metric)
        study.tell(trial, state=TrialState.FAIL)


def run_sweep(cfg, overrides: list[str]) -> tuple[Path, dict | None]:
    """`crabsweep sweep`: the main process spawns `sweep.workers - 1` local workers and works itself;
    a worker (`sweep.role=worker`) only works. Returns the study folder and the summary (main only)."""
    from ..console import setup_logging
    study_dir = Path(cfg.sweep.dir or f"multirun/{cfg.sweep.study}")
    setup_logging(study_dir)
    t0 = time.perf_counter()
    if cfg.sweep.role == "worker":
        run_worker(cfg, overrides, study_dir)
        return study_dir, None
    save_config(cfg, overrides, study_dir)
    workers = spawn_workers(int(cfg.sweep.workers) - 1, overrides)
    try:
        run_worker(cfg, overrides, study_dir)
    finally:
        for w in workers:
            w.wait()
    return study_dir, summarize(cfg, study_dir, time.perf_counter() - t0)


def _session_for(cfg, sessions: dict[str, Session]) -> Session:
    """One Session per model/task/adapter/granularity in this process; other settings swap in."""
    key = Session.structure_key(cfg)
    if key not in sessions:
        sessions.clear()                     # one model in memory at a time
        sessions[key] = Session(cfg)
    session = sessions[key]
    session.cfg = cfg
    return session


def spawn_workers(n: int, argv_overrides: list[str]) -> list[subprocess.Popen]:
    cmd = [sys.executable, "-m", "crabsweep.cli", "sweep", *argv_overrides, "sweep.workers=1", "sweep.role=worker"]
    return [subprocess.Popen(cmd) for _ in range(n)]


def summarize(cfg, study_dir: Path, seconds: float) -> dict:
    """summary.json + a W&B summary run (best trial, state counts, cache hits, Optuna plots)."""
    from ..track.report import write_report
    study = open_study(cfg, study_dir)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    summary = {
        "study": cfg.sweep.study, "states": states, "seconds": seconds,
        "best_trial": {"number": best.number, "value": best.value, "params": best.params} if best else None,
        "cache": {"hits": sum(t.user_attrs.get("cache_hits", 0) for t in trials),
                  "misses": sum(t.user_attrs.get("cache_misses", 0) for t in trials)},
    }
    io.write_json(study_dir / "summary.json", summary)
    log.info("study %s: %s; round cache %d hits / %d misses", cfg.sweep.study, states,
             summary["cache"]["hits"], summary["cache"]["misses"])
    report = write_report(study_dir)
    tracker = make_tracker(cfg, name=f"{cfg.sweep.study}-summary", group=cfg.sweep.study, job_type="summary",
                           config=OmegaConf.to_container(cfg.sweep), directory=Path(cfg.tracker.dir or study_dir),
                           run_dir=study_dir)
    if hasattr(tracker, "log_summary"):
        flat = {"best_value": best.value if best else None, "best_trial": best.number if best else None,
                "cache_hits": summary["cache"]["hits"], "cache_misses": summary["cache"]["misses"],
                **{f"trials_{k.lower()}": v for k, v in states.items()}}
        tracker.log_summary(flat, report["images"])
    return summary
