"""The Crab Step chain: plan → execute rounds (and their controls) → record.

Round 0 suppresses the inventory S_0; after round r, S_{r+1} = S_r ∪ top-K(round r) by the ranking
attribution method. Each round folder (`round_<r>/`: record.json, scores.safetensors, adapter/) and
its matched random control (`round_<r>/control/`) are written under temporary names and renamed when
complete, separately, so a failing control never discards a finished round and a chain killed
mid-round resumes after its last complete round. `chain.json` is rebuilt from the round records.

Round 0 is a gate: if it did not learn the behaviour (loop/objective.learned) the chain stops and has no
trajectory. Per-round metrics beyond the round's own (loop/round.py: losses, behaviour- and content-token
CE, task score, damage and collateral of the mask): delta_loss (init − final: the reference's number),
final_gap (final − round 0's final), top1_score, layers_with_recruits, generation_similarity (to round 0),
and with the matched random control (every round by default) the control's numbers as `*_random`,
specificity = final_gap − final_gap_random and the selective objective (loop/objective.py: selectivity).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .. import io
from ..core.basis import Unit
from ..core.unitsets import load_units, save_units
from ..errors import UserError
from ..methods.selection import check_k, matched_random, select
from .cache import cached_round, package_versions
from .metrics import baselines, massive_units, recruit_audit
from .objective import against_control, learned
from .trajectory import classify, idle_audit, similarity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChainPlan:
    rounds: int                 # rounds 1..N after round 0
    inventory: tuple[Unit, ...]
    method: str
    control: str                # last | every | none
    seed: int


def plan_chain(session) -> ChainPlan:
    """Check the inventory and K against the model before anything trains."""
    cfg = session.cfg
    inventory = session.basis.check(load_units(cfg.chain.inventory, session.basis) if cfg.chain.inventory else [],
                                    "chain.inventory unit")
    check_k(cfg.k, session.basis.sizes, len(inventory), int(cfg.chain.rounds))
    return ChainPlan(int(cfg.chain.rounds), tuple(inventory), cfg.attribution.name, cfg.chain.control, int(cfg.seed))


def fingerprints(session) -> dict:
    pkgs = {**package_versions(), **{p: version(p) for p in ("numpy", "safetensors")}}
    return {"model": session.loaded.fingerprint, "task_files": session.task.files,
            "packages": {**pkgs, "python": platform.python_version()},
            "device": str(session.device), "dtype": str(session.loaded.dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}


def completed_rounds(run_dir: Path) -> list[dict]:
    """Records of the complete rounds 0, 1, … (a round folder exists only once complete)."""
    out = []
    while (run_dir / f"round_{len(out)}" / "record.json").exists():
        out.append(io.read_json(run_dir / f"round_{len(out)}" / "record.json"))
    return out


def _units(session, items) -> list[Unit]:
    return [session.basis.unit_from_json(x) for x in items]


def _stop_reason(ccfg, metrics: dict, rounds: list[dict]) -> str | None:
    gap_limit = ccfg.stop.final_gap_above
    if gap_limit is not None and metrics["final_gap"] > float(gap_limit):
        return f"final_gap {metrics['final_gap']:.3f} > {gap_limit} (the capability broke)"
    frac = ccfg.stop.top1_fraction
    if frac is not None and len(rounds) >= 2 and rounds[1]["metrics"]["top1_score"]:
        ref = rounds[1]["metrics"]["top1_score"]
        if metrics["top1_score"] is not None and metrics["top1_score"] < float(frac) * ref:
            return f"top1_score {metrics['top1_score']:.4g} < {frac} × round 1's {ref:.4g} (pool exhausting)"
    return None


def run_chain(session, run_dir: str | Path, cache=None, tracker=None,
              on_round: Callable[[dict], str | None] | None = None) -> dict:
    """Run (or resume) the chain into `run_dir`. `on_round(record)` may return a reason to stop
    (the sweep's pruner); `cache` reuses rounds with identical inputs; `tracker` mirrors the records.
    With `chain.seeds` (≥ 2 seeds) every seed runs its own chain in `seed_<s>/` (loop/replicates.py)."""
    seeds = session.cfg.chain.get("seeds")
    if seeds is not None and len(seeds) > 1:
        from .replicates import run_replicates
        return run_replicates(session, Path(run_dir), [int(s) for s in seeds], cache, tracker, on_round)
    plan = plan_chain(session)
    run_dir = Path(run_dir)
    rounds, stopped = execute(session, plan, run_dir, cache, tracker, on_round)
    return record_chain(session, plan, run_dir, rounds, stopped, cache, tracker)


def execute(session, plan: ChainPlan, run_dir: Path, cache, tracker, on_round) -> tuple[list[dict], str | None]:
    done = completed_rounds(run_dir)
    if done:
        log.info("resuming %s after round %d", run_dir, len(done) - 1)
    rounds: list[dict] = []
    suppressed = list(plan.inventory)
    stopped = None
    bar = tqdm(range(plan.rounds + 1), desc="rounds", disable=None)
    for r in bar:
        if r < len(done):
            rec = done[r]
            if _units(session, rec["suppressed"]) != suppressed:
                raise UserError(f"{run_dir}/round_{r} was made with a different suppressed set; use a new hydra.run.dir")
        else:
            with _failure_record(session, run_dir, r, suppressed):
                rec = _main_round(session, plan, r, suppressed, rounds, cache, run_dir / f"round_{r}")
        rounds.append(rec)
        stopped = _stop_reason(session.cfg.chain, rec["metrics"], rounds)
        if r == 0:
            passed, why = learned(rec["metrics"], session.cfg.chain.gate)
            stopped = stopped if passed else why
        if _needs_control(plan, r, suppressed, stopped is not None or r == plan.rounds):
            with _failure_record(session, run_dir, r, suppressed, "control"):
                _ensure_control(session, plan, r, suppressed, rounds, cache, run_dir / f"round_{r}")
        if tracker is not None:
            tracker.log_round(rec)
        if not stopped and on_round is not None:
            stopped = on_round(rec)
        if stopped:
            log.info("stopping after round %d: %s", r, stopped)
            break
        suppressed = suppressed + _units(session, [x["unit"] for x in rec["recruits"]["selected"]])
    bar.close()
    return rounds, stopped


@contextmanager
def _failure_record(session, run_dir: Path, r: int, suppressed, part: str = "round"):
    """A round (or its control) that raises leaves `round_<r>.failed.json` (what failed and why) beside
    the complete rounds; it is never read as a round, and a later success of round r removes it. (Round 0
    leaves none: with nothing complete, the command removes the run folder it made.)"""
    marker = run_dir / f"round_{r}.failed.json"
    try:
        yield
    except Exception as e:
        if r == 0 and part == "round":
            raise
        io.write_json(marker, {"round": r, "part": part, "error": f"{type(e).__name__}: {e}",
                               "suppressed": [session.basis.unit_json(u) for u in suppressed]})
        log.info("round %d: the %s failed; recorded in %s", r, part, marker)   # the error itself is raised
        raise
    marker.unlink(missing_ok=True)


def _main_round(session, plan, r, suppressed, rounds, cache, folder: Path) -> dict:
    """Run round r (through the cache), derive its chain metrics and selection, commit its folder."""
    result = cached_round(session, suppressed, r, cache, seed=plan.seed)
    m = result.metrics
    round0 = rounds[0] if rounds else None
    ratio = session.cfg.attribution.get("exclude_massive")
    excluded = set(suppressed) | (set(massive_units(session, float(ratio))) if ratio else set())
    selected = select(result.scores[plan.method], excluded, session.cfg.k, r,
                      session.cfg.attribution.get("normalize", "none"), basis_json=session.basis.unit_json)
    m.update({
        "delta_loss": m["init_loss"] - m["final_loss"],
        "final_gap": m["final_loss"] - (round0["metrics"]["final_loss"] if round0 else m["final_loss"]),
        "top1_score": selected[0]["score"] if selected else None,
        "layers_with_recruits": len({layer for x in selected for layer in session.basis.layers_of(
            session.basis.unit_from_json(x["unit"]))}),
        "generation_similarity": similarity(round0["generations"], result.generations) if round0 else None,
    })
    if session.cfg.chain.get("faithfulness"):   # circuits: are this round's recruits a circuit of the task?
        from ..circuits.faithfulness import chain_round_faithfulness
        m.update(chain_round_faithfulness(session, _units(session, [x["unit"] for x in selected])))
    rec = result.record()
    rec["recruits"] = {"method": plan.method, "selected": selected, "top": result.recruits}
    if session.cfg.chain.get("recruit_audit") and r < plan.rounds:      # the last round's picks are never suppressed
        rec["recruits"]["audit"] = recruit_audit(session, [session.basis.unit_from_json(x["unit"]) for x in selected],
                                                 store=cache.unit_collateral(session) if cache else None)
    with io.staged_dir(folder) as tmp:                                    # appears only when complete
        io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
        result.save_adapter(session, tmp / "adapter")
        io.write_json(tmp / "record.json", rec)
    return rec


def _needs_control(plan, r, suppressed, is_last) -> bool:
    return bool(suppressed) and plan.control != "none" and (plan.control == "every" or is_last)


def _ensure_control(session, plan, r, suppressed, rounds, cache, folder: Path) -> None:
    """The matched random control of round r in its own staged folder; its numbers join the round's record."""
    rec = rounds[r]
    path = folder / "control" / "record.json"
    round0 = rounds[0]
    if path.exists():
        control = io.read_json(path)
    else:
        units = matched_random(suppressed, session.basis.sizes, plan.seed * 1000 + r)
        result = cached_round(session, units, r, cache, seed=plan.seed, posthoc=False, mask_off=False,
                              label=f"control {r}")
        control = result.record()
        control.pop("recruits")
        control["metrics"] = {**control["metrics"],
                              "final_gap": control["metrics"]["final_loss"] - round0["metrics"]["final_loss"],
                              "generation_similarity": similarity(round0["generations"], control["generations"])}
        with io.staged_dir(folder / "control") as tmp:
            io.write_json(tmp / "record.json", control)
    m = rec["metrics"]
    if "final_gap_random" not in m:
        m.update(against_control(m, control["metrics"], round0["metrics"], session.cfg.chain.objective))
        m["generation_similarity_random"] = control["metrics"].get("generation_similarity")
        io.write_json(folder / "record.json", rec)


def record_chain(session, plan, run_dir: Path, rounds: list[dict], stopped, cache, tracker) -> dict:
    """chain.json (derived from the round records), units.json, the Circuit export and chain.png."""
    cfg, basis = session.cfg, session.basis
    methods = {rec["recruits"]["method"] for rec in rounds}
    selected_last = _units(session, [x["unit"] for x in rounds[-1]["recruits"]["selected"]])
    final = _units(session, rounds[-1]["suppressed"]) + selected_last
    chain = {
        "config": {"rounds": plan.rounds, "k": OmegaConf.to_container(cfg.k), "attribution": "+".join(sorted(methods)),
                   "granularity": basis.name, "adapter": session.adapter.name, "control": plan.control,
                   "group": getattr(tracker, "group", None),
                   "inventory": [basis.unit_json(u) for u in plan.inventory]},
        "baseline": {k: v for k, v in baselines(session).items() if k != "generic"},
        "rounds": [{k: rec[k] for k in ("round", "suppressed", "recruits", "metrics", "generations")} for rec in rounds],
        "stopped": stopped,
        "trajectory": classify(rounds, cfg.chain.classify, learned(rounds[0]["metrics"], cfg.chain.gate),
                               cfg.chain.gate.get("min_task_score")),
        "idle": idle_audit(basis.sizes, final),
        "fingerprints": fingerprints(session),
    }
    scores = {session.basis.unit_from_json(x["unit"]): x["score"] for rec in rounds for x in rec["recruits"]["selected"]}
    save_units(run_dir / "units.json", final, basis)
    if basis.name == "mlp_neuron":
        save_units(run_dir / "units.circuit.json", final, basis, scores, fmt="circuit")
    if cache is not None:
        chain["cache"] = cache.stats()
    io.write_json(run_dir / "chain.json", chain)
    if tracker is not None:
        tracker.finish(chain)
    from ..track.plots import plot_chain
    plot_chain(chain, rounds, basis.sizes, run_dir / "chain.png", group_of=lambda u: basis.unit_from_json(u).group)
    return chain
