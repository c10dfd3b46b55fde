"""The Crab Step chain: rounds 0..N in one process, with honest metrics, a random control and resume.

Round 0 suppresses the inventory S_0; after round r, S_{r+1} = S_r ∪ top-K(round r) by the ranking
attribution method. Each round folder (`round_<r>/`: record.json, scores.safetensors, adapter/,
control/record.json) is written under a temporary name and renamed when complete, so a chain killed
mid-round resumes after its last complete round. `chain.json` is rebuilt from the round records.

Per-round metrics beyond the round's own: delta_loss (init − final: the reference's number),
final_gap (final − round 0's final), damage (base + mask − base, no adapter, train targets),
collateral (the same on unrelated text), top1_score, layers_with_recruits, and with the matched random
control final_gap_random and specificity = final_gap − final_gap_random.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .. import io
from ..errors import UserError
from .metrics import base_loss, text_examples
from .cache import RoundCache, round_key
from .round import RoundResult, run_round
from ..methods.selection import check_k, matched_random, select
from ..core.session import Session
from .trajectory import classify, idle_audit
from ..core.basis import Unit, unit_from_json, unit_json
from ..core.unitsets import load_units, save_units

log = logging.getLogger(__name__)


def fingerprints(session: Session) -> dict:
    pkgs = {p: version(p) for p in ("crabsweep", "torch", "transformers", "peft", "numpy", "safetensors")}
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


def run_chain(session: Session, run_dir: str | Path, cache: RoundCache | None = None, tracker=None,
              on_round: Callable[[dict], str | None] | None = None) -> dict:
    """Run (or resume) the chain into `run_dir`. `on_round(record)` may return a reason to stop
    (the sweep's pruner); `cache` reuses rounds with identical inputs; `tracker` mirrors the records."""
    cfg, space = session.cfg, session.space
    ccfg, run_dir = cfg.chain, Path(run_dir)
    method = cfg.attribution.name
    inventory = load_units(ccfg.inventory) if ccfg.inventory else []
    space.check(inventory, "chain.inventory unit")
    n_rounds = int(ccfg.rounds)
    check_k(cfg.k, space.sizes, len(inventory), n_rounds)

    generic = text_examples(cfg.eval.collateral_path, session.tokenizer)
    baseline = {"train_loss": base_loss(session, session.task.train, []),
                "collateral_loss": base_loss(session, generic, [])}
    done = completed_rounds(run_dir)
    if done:
        log.info("resuming %s after round %d", run_dir, len(done) - 1)
    rounds: list[dict] = []
    suppressed: list[Unit] = list(inventory)
    stopped = None
    bar = tqdm(range(n_rounds + 1), desc="rounds", disable=None)
    for r in bar:
        if r < len(done):
            rec = done[r]
            if [unit_from_json(u) for u in rec["suppressed"]] != suppressed:
                raise UserError(f"{run_dir}/round_{r} was made with a different suppressed set; "
                                "use a new hydra.run.dir")
            rounds.append(rec)
            stopped = _stop_reason(ccfg, rec["metrics"], rounds)
        else:
            rec, result = _run_one(session, r, suppressed, rounds, baseline, generic, method, cache)
            rounds.append(rec)
            stopped = _stop_reason(ccfg, rec["metrics"], rounds)
            with io.staged_dir(run_dir / f"round_{r}") as tmp:     # appears only when complete
                io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
                result.save_adapter(session, tmp / "adapter")
                control = _control(session, r, suppressed, rounds, stopped is not None or r == n_rounds, cache)
                if control is not None:
                    io.write_json(tmp / "control" / "record.json", control)
                    rec["metrics"]["final_gap_random"] = control["metrics"]["final_gap"]
                    rec["metrics"]["specificity"] = rec["metrics"]["final_gap"] - control["metrics"]["final_gap"]
                io.write_json(tmp / "record.json", rec)
        if tracker is not None:
            tracker.log_round(rec)
        if not stopped and on_round is not None:
            stopped = on_round(rec)
        if stopped:
            log.info("stopping after round %d: %s", r, stopped)
            break
        suppressed = suppressed + [unit_from_json(x["unit"]) for x in rec["recruits"]["selected"]]
    bar.close()

    selected_last = [unit_from_json(x["unit"]) for x in rounds[-1]["recruits"]["selected"]]
    chain = {
        "config": {"rounds": n_rounds, "k": OmegaConf.to_container(cfg.k), "attribution": method,
                   "granularity": space.name, "control": ccfg.control, "group": getattr(tracker, "group", None),
                   "inventory": [unit_json(u) for u in inventory]},
        "baseline": baseline,
        "rounds": [{k: rec[k] for k in ("round", "suppressed", "recruits", "metrics", "generations")}
                   for rec in rounds],
        "stopped": stopped,
        "trajectory": classify(rounds, ccfg.classify),
        "idle": idle_audit(space.sizes, [unit_from_json(u) for u in rounds[-1]["suppressed"]] + selected_last),
        "fingerprints": fingerprints(session),
    }
    final = [unit_from_json(u) for u in rounds[-1]["suppressed"]] + selected_last
    scores = {unit_from_json(x["unit"]): x["score"] for rec in rounds for x in rec["recruits"]["selected"]}
    save_units(run_dir / "units.json", final, space.name)
    if space.name == "mlp_neuron":
        save_units(run_dir / "units.circuit.json", final, space.name, scores, fmt="circuit")
    if cache is not None:
        chain["cache"] = cache.stats()
    io.write_json(run_dir / "chain.json", chain)
    if tracker is not None:
        tracker.finish(chain)
    from ..track.plots import plot_chain
    plot_chain(chain, rounds, space.sizes, run_dir / "chain.png")
    return chain


def _round(session, suppressed, r, cache, generations=True) -> RoundResult:
    """run_round through the cache, when there is one."""
    if cache is None:
        return run_round(session, suppressed, r, generations)
    key = round_key(session, suppressed, generations)
    result = cache.get(key, r, suppressed)
    if result is None:
        result = run_round(session, suppressed, r, generations)
        cache.put(key, result, session)
    return result


def _run_one(session, r, suppressed, rounds, baseline, generic, method, cache) -> tuple[dict, RoundResult]:
    result = _round(session, suppressed, r, cache)
    m = result.metrics
    round0_final = rounds[0]["metrics"]["final_loss"] if rounds else m["final_loss"]
    selected = select(result.scores[method], set(suppressed), session.cfg.k, r,
                      session.cfg.attribution.get("normalize", "none"))
    m.update({
        "delta_loss": m["init_loss"] - m["final_loss"],
        "final_gap": m["final_loss"] - round0_final,
        "damage": m["init_loss"] - baseline["train_loss"],            # init = base + mask (B = 0)
        "collateral": base_loss(session, generic, suppressed) - baseline["collateral_loss"],
        "top1_score": selected[0]["score"] if selected else None,
        "layers_with_recruits": len({x["unit"]["layer"] for x in selected}),
    })
    rec = result.record()
    rec["recruits"] = {"method": method, "selected": selected, "top": result.recruits}
    return rec, result


def _control(session, r, suppressed, rounds, is_last, cache) -> dict | None:
    """The matched random control for round r, when `chain.control` asks for one and S is non-empty."""
    mode = session.cfg.chain.control
    if not suppressed or mode == "none" or (mode == "last" and not is_last):
        return None
    units = matched_random(suppressed, session.space.sizes, int(session.cfg.seed) * 1000 + r)
    result = _round(session, units, r, cache, generations=False)
    result.metrics = dict(result.metrics)
    result.metrics["final_gap"] = result.metrics["final_loss"] - rounds[0]["metrics"]["final_loss"]
    rec = result.record()
    rec.pop("recruits")
    return rec
