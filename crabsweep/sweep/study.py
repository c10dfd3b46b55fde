"""`crabsweep sweep`: an Optuna ask/tell loop whose trials are whole Crab Step chains.

The study folder is `<sweep.dir>/<study>/` (sweep.dir defaults to `multirun`): `sweep.json`, the study's
config, `study.db` (sqlite storage), the report, and one chain folder per trial, `trial_<n>/`. The round
cache, `<sweep.dir>/cache/`, is shared by the studies of one sweep.dir.

Everything that can be checked is checked before anything is written: the search space, each param's
every choice composed once into a trial config, the objective metric and its prerequisites, the storage.
A trial's config is `sweep.overrides`, then the command line's overrides, then the trial's params (later
wins). Each finished round reports the objective (the pruner may stop the chain: PRUNED, with its
completed rounds); the last round's value is the trial's. Workers: sweep/workers.py; how they start:
sweep/launchers.py; storages and secrets: sweep/storage.py; search space and samplers: sweep/params.py.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState
from tqdm.auto import tqdm

from .. import io
from ..config import check_run_dir, compose_config, save_config
from ..core.session import Session
from ..errors import UserError
from ..loop.metric_names import ALL_METRICS, CONTROL_METRICS
from ..redact import redact, redact_text
from ..track.wandb import make_tracker
from .params import make_pruner, make_sampler, override, sampler_name, search_space, space_size, trial_cap, values
from .storage import local_file, make_storage, public_overrides, storage_url, write_record
from .workers import Heartbeat, Worker, fail_trial, next_trial, register, set_attr, study_attrs

log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    """A validated sweep: what every worker of this invocation works from."""
    cfg: object
    study_dir: Path
    url: str
    space: dict
    cap: int
    rounds: int                       # chain.rounds of a trial (before its params): the pruner's resource
    public: list[str]                 # the command line's overrides, secrets replaced, sweep.role dropped
    config_dir: str | None = None
    slot: str | None = None           # the launcher's id for this worker
    workers: int = 1                  # sweep.workers resolved (`auto` → per core)

    @property
    def scfg(self):
        return self.cfg.sweep


def study_folder(scfg) -> Path:
    return Path(scfg.dir or "multirun") / scfg.study


def compose_trial(plan: SweepPlan, params: dict, run_dir: Path | None = None):
    """A trial's chain config: sweep.overrides < command line < the trial's params."""
    extra = [override("hydra.run.dir", str(run_dir))] if run_dir is not None else []
    tcfg, _ = compose_config("chain", [*plan.scfg.overrides, *plan.public,
                                       *(override(k, v) for k, v in params.items()), *extra], plan.config_dir)
    return tcfg


def check_objective(tcfg, where: str) -> None:
    metric = tcfg.sweep.objective.metric
    if metric in CONTROL_METRICS and tcfg.chain.control == "none":
        raise UserError(f"sweep.objective.metric={metric} needs the matched random control but {where} has "
                        "chain.control=none; use chain.control=every|last or another metric")


def plan_sweep(cfg, overrides: list[str], config_dir: str | None = None, slot: str | None = None) -> SweepPlan:
    """Validate the sweep before anything is written (a spawned worker skips what its main checked)."""
    scfg = cfg.sweep
    metric = scfg.objective.metric
    if metric not in ALL_METRICS:
        raise UserError(f"sweep.objective.metric={metric} is not a per-round metric; use one of "
                        f"{', '.join(ALL_METRICS)}")
    study_dir = study_folder(scfg)
    space = search_space(scfg.params)
    make_sampler(scfg, space)                                    # a sampler that cannot take this space
    from .launchers import LAUNCHERS
    LAUNCHERS.get(scfg.launcher)
    plan = SweepPlan(cfg, study_dir, storage_url(scfg.storage, study_dir), space, trial_cap(scfg, space), 0,
                     public_overrides(overrides), config_dir, slot)
    base = compose_trial(plan, {})
    plan.rounds = int(base.chain.rounds)
    from ..core.device import resolve_device
    from .launchers import n_workers
    plan.workers = n_workers(scfg, plan.cap, resolve_device(str(base.device)).type)
    make_pruner(scfg.pruner, plan.rounds)
    if scfg.role == "worker":
        return plan
    swept = set(space)
    for o in plan.public:
        if o.split("=", 1)[0].lstrip("+~") in swept:
            log.warning("%s on the command line is a swept param: each trial's value wins", o)
    check_objective(base, "the sweep's chain config")
    for key, spec in space.items():
        for value in values(spec) if spec["type"] == "categorical" else [spec["low"], spec["high"]]:
            try:
                check_objective(compose_trial(plan, {key: value}), f"the trial config {key}={value}")
            except UserError as e:
                raise UserError(f"sweep.params.{key}: {key}={value} fails: {e}") from None
    if local_file(plan.url) is None or local_file(plan.url).exists():
        _check_existing(plan)                                    # without creating a local storage
    return plan


def describe_space(plan: SweepPlan) -> str:
    dims = " × ".join(f"{k} ({len(values(s)) if values(s) else '∞'})" for k, s in plan.space.items())
    size = space_size(plan.space)
    text = f"sampler {sampler_name(plan.scfg, plan.space)} over {dims or 'no params'}"
    text += f" = {size} points" if size != math.inf else ""
    if plan.cap < int(plan.scfg.n_trials):
        text += f"; the study stops after {plan.cap} trials (sweep.allow_repeats=false)"
    return text


def _check_existing(plan: SweepPlan) -> None:
    """A study resumed under its name must optimize the same metric in the same direction."""
    scfg = plan.scfg
    try:
        study = optuna.load_study(study_name=scfg.study, storage=make_storage(plan.url))
    except KeyError:
        return
    if study.metric_names and study.metric_names != [scfg.objective.metric] or \
            study.direction.name.lower() != scfg.objective.direction:
        raise UserError(f"study {scfg.study} optimizes {study.metric_names} ({study.direction.name.lower()}); "
                        f"use another sweep.study for {scfg.objective.metric} ({scfg.objective.direction})")


def open_study(plan: SweepPlan, seed: int = 0) -> optuna.Study:
    scfg = plan.scfg
    return optuna.create_study(study_name=scfg.study, storage=make_storage(plan.url),
                               sampler=make_sampler(scfg, plan.space, seed),
                               pruner=make_pruner(scfg.pruner, plan.rounds),
                               direction=scfg.objective.direction, load_if_exists=True)


def run_sweep(cfg, overrides: list[str], config_dir: str | None = None, slot: str | None = None):
    """`crabsweep sweep`: the main process validates, records the study, starts `sweep.workers` workers with
    the configured launcher and writes the summary; a worker (`sweep.role=worker`) only works.
    Returns the study folder and the summary (main only)."""
    from ..console import setup_logging
    from .launchers import launch
    sys.argv[1:] = [redact_text(a) for a in sys.argv[1:]]     # libraries that record argv (W&B) see no secret
    setup_logging(None)
    plan = plan_sweep(cfg, overrides, config_dir, slot)
    if cfg.sweep.role == "worker":
        setup_logging(plan.study_dir)
        run_worker(plan)
        return plan.study_dir, None
    t0 = time.perf_counter()
    created = not plan.study_dir.exists()
    try:
        plan.study_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the study folder {plan.study_dir} ({e.strerror}); set sweep.dir") from e
    setup_logging(plan.study_dir)
    save_config(cfg, overrides, plan.study_dir)
    study = open_study(plan)
    _describe(study, plan, overrides)
    start = len(study.get_trials(deepcopy=False))
    log.info("%s study %s in %s; %s", "new" if created else "resuming", cfg.sweep.study, plan.study_dir,
             describe_space(plan))
    sessions = warm_start(plan, study)
    launch(plan, functools.partial(run_worker, sessions=sessions))
    stopped = study_attrs(study).get("stopped")
    reason = stopped["reason"] if stopped and int(stopped["at"]) > start else None
    summary = summarize(plan, time.perf_counter() - t0, reason)
    if reason:
        raise UserError(f"sweep stopped: {reason}; fix the cause and run the same command to continue the study")
    return plan.study_dir, summary


def _describe(study, plan: SweepPlan, overrides: list[str]) -> None:
    """sweep.json, and the study's metadata for Optuna's tools (metric name, redacted config, overrides)."""
    scfg = plan.scfg
    write_record(plan.study_dir, {"study": scfg.study, "storage": plan.url,
                                  "objective": OmegaConf.to_container(scfg.objective)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([scfg.objective.metric])
    study.set_user_attr("config", redact(OmegaConf.to_container(plan.cfg, resolve=True)))
    study.set_user_attr("overrides", [redact_text(o) for o in overrides])


# --------------------------------------------------------------------------------------------------
# A worker: ask, run the chain, tell — until the cap, a stop, or the end of the space
# --------------------------------------------------------------------------------------------------
def warm_start(plan: SweepPlan, study) -> dict:
    """Before several local workers start: when no swept parameter can change round 0 (e.g. attribution × K),
    train it once on every core into the round cache, so the workers read it instead of each training the
    same round on one core at the same time. Returns the session, which this process's worker keeps."""
    from ..loop.cache import ROUND_DENY, RoundCache, cached_round
    from ..loop.chain import plan_chain
    from .launchers import cores
    scfg = plan.scfg
    shared = all(any(k == d or k.startswith(d + ".") for d in ROUND_DENY) for k in plan.space)
    finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
    if plan.workers < 2 or scfg.launcher != "local" or not scfg.cache or not shared or finished >= plan.cap:
        return {}
    tcfg = compose_trial(plan, {})
    if len(tcfg.chain.get("seeds") or []) > 1:
        return {}
    torch.set_num_threads(cores())
    sessions: dict[str, Session] = {}
    session = _session_for(tcfg, sessions)
    try:
        chain = plan_chain(session)
        cached_round(session, list(chain.inventory), 0, RoundCache(plan.study_dir.parent / "cache"), seed=chain.seed,
                     posthoc=False)
    except Exception as e:  # noqa: BLE001 — the trials meet the same problem and report it in their records
        log.warning("warm start: round 0 was not precomputed (%s); the trials compute it", e)
    return sessions


def run_worker(plan: SweepPlan, sessions: dict | None = None) -> tuple[str, str]:
    from ..loop.cache import RoundCache
    scfg = plan.scfg
    study = open_study(plan)
    worker = Worker(study, plan.url, plan.study_dir, scfg, plan.space, plan.cap, plan.slot)
    study.sampler = make_sampler(scfg, plan.space, register(worker))
    cache = RoundCache(plan.study_dir.parent / "cache") if scfg.cache else None
    sessions = {} if sessions is None else sessions
    bar = tqdm(total=plan.cap, desc="trials", disable=None)
    while True:
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))
        bar.update(min(finished, bar.total) - bar.n)       # counts every worker's trials
        nxt = next_trial(worker)
        if nxt is None:
            time.sleep(float(scfg.heartbeat.interval) / 2)
            continue
        if nxt[0] in ("done", "stopped"):
            bar.close()
            (log.error if nxt[0] == "stopped" else log.info)("worker %s: %s", worker.name, nxt[1])
            return nxt
        run_trial(worker, plan, *nxt, cache=cache, sessions=sessions)


def run_trial(worker: Worker, plan: SweepPlan, trial, params: dict, cache, sessions: dict) -> None:
    scfg, study = plan.scfg, worker.study
    run_dir = plan.study_dir / f"trial_{trial.number}"
    set_attr(study, trial._trial_id, "run_dir", run_dir.name)            # relative to the study folder
    log.info("trial %d: %s", trial.number, " ".join(override(k, v) for k, v in params.items()))
    tracker, max_retry = None, int(scfg.heartbeat.max_retry)
    try:
        with Heartbeat(worker, trial, float(scfg.heartbeat.interval)):
            tcfg = compose_trial(plan, params, run_dir)
            check_run_dir(tcfg, run_dir)
            with io.owned_run_dir(run_dir):
                from ..api import chain_config
                save_config(tcfg, [*scfg.overrides, *plan.public, *(override(k, v) for k, v in params.items())],
                            run_dir)
                tracker = make_tracker(tcfg, name=f"{scfg.study}-trial{trial.number}", group=scfg.study,
                                       job_type="chain", directory=Path(tcfg.tracker.dir or plan.study_dir),
                                       config={**chain_config(tcfg), "trial": trial.number,
                                               "trial_params": params}, adapters_from=run_dir, run_dir=run_dir)
                hits0, misses0 = (cache.hits, cache.misses) if cache else (0, 0)
                chain = _run_chain(_session_for(tcfg, sessions), run_dir, cache, tracker, trial, tcfg)
    except KeyboardInterrupt:
        _abandon(study, trial, tracker, "interrupted", "interrupted", max_retry)
        raise
    except SystemExit as e:           # submitit's requeue on preemption or timeout exits the process
        _abandon(study, trial, tracker, f"preempted (exit {e.code}); its worker is requeued", "preempted", max_retry)
        raise
    except Exception as e:  # noqa: BLE001 — one failed chain must not stop the sweep
        if type(e).__module__.startswith("submitit"):    # the job ends without a requeue (e.g. timed out)
            _abandon(study, trial, tracker, f"stopped by submitit: {e}", "preempted", max_retry)
            raise
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        (log.error if isinstance(e, UserError) else log.exception)("trial %d failed: %s", trial.number, reason)
        _abandon(study, trial, tracker, reason, "error", None)
        return
    if cache is not None:
        set_attr(study, trial._trial_id, "cache_hits", cache.hits - hits0)
        set_attr(study, trial._trial_id, "cache_misses", cache.misses - misses0)
    trial.set_user_attr("trajectory", chain["trajectory"]["class"])
    trial.set_user_attr("rounds_completed", len(chain["rounds"]))
    last = chain["rounds"][-1]
    value = last["metrics"].get(scfg.objective.metric)
    if chain["stopped"] and chain["stopped"].startswith("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
    elif not _finite(value):
        reason = f"objective {scfg.objective.metric} is {value} in round {last['round']}"
        log.error("trial %d failed: %s", trial.number, reason)
        fail_trial(study, trial, reason, "error")
    else:
        study.tell(trial, float(value))


def _run_chain(session, run_dir: Path, cache, tracker, trial, tcfg) -> dict:
    from ..loop.chain import run_chain
    scfg = tcfg.sweep

    def on_round(rec: dict) -> str | None:
        value = rec["metrics"].get(scfg.objective.metric)
        if not _finite(value):
            return None
        trial.report(float(value), step=rec["round"])
        if rec["round"] < int(tcfg.chain.rounds) and trial.should_prune():   # a finished chain is never "pruned"
            return f"pruned by the {scfg.pruner.name} pruner after round {rec['round']}"
        return None

    return run_chain(session, run_dir, cache=cache, tracker=tracker, on_round=on_round)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _abandon(study, trial, tracker, reason: str, kind: str, max_retry: int | None) -> None:
    """Fail a trial that did not finish (and queue its re-run when it was interrupted, not broken)."""
    try:
        if tracker is not None:
            tracker.finish(None, state="failed")
        fail_trial(study, trial, redact_text(reason), kind, max_retry)
        if kind != "error":
            log.warning("trial %d: FAIL (%s)", trial.number, reason)
    except Exception as e:  # noqa: BLE001 — the storage may be what broke; stale detection covers it
        log.error("trial %d: could not record its failure (%s)", trial.number, e)


def _session_for(cfg, sessions: dict[str, Session]) -> Session:
    """One Session per model/task/adapter/granularity in this process; other settings swap in."""
    key = Session.structure_key(cfg)
    if key not in sessions:
        sessions.clear()                     # one model in memory at a time
        sessions[key] = Session(cfg)
    session = sessions[key]
    session.cfg = cfg
    return session


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def summarize(plan: SweepPlan, seconds: float, stopped: str | None = None) -> dict:
    """summary.json, the report, and a W&B summary run (best trial, state counts, cache hits, plots)."""
    from ..track.report import write_report
    cfg, study_dir = plan.cfg, plan.study_dir
    study = open_study(plan)
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if completed else None
    summary = {
        "study": cfg.sweep.study, "states": states, "seconds": seconds, "stopped": stopped,
        "best_trial": {"number": best.number, "value": best.value, "params": best.params} if best else None,
        "cache": {"hits": sum(t.system_attrs.get("cache_hits", 0) for t in trials),
                  "misses": sum(t.system_attrs.get("cache_misses", 0) for t in trials)},
    }
    io.write_json(study_dir / "summary.json", summary)
    log.info("study %s: %s; round cache %d hits / %d misses", cfg.sweep.study, states,
             summary["cache"]["hits"], summary["cache"]["misses"])
    report = write_report(study_dir)
    tracker = make_tracker(cfg, name=f"{cfg.sweep.study}-summary", group=cfg.sweep.study, job_type="summary",
                           config=redact(OmegaConf.to_container(cfg.sweep)),
                           directory=Path(cfg.tracker.dir or study_dir), run_dir=study_dir)
    if hasattr(tracker, "log_summary"):
        flat = {"best_value": best.value if best else None, "best_trial": best.number if best else None,
                "cache_hits": summary["cache"]["hits"], "cache_misses": summary["cache"]["misses"],
                **{f"trials_{k.lower()}": v for k, v in states.items()}}
        tracker.log_summary(flat, report["images"])
    return summary
