"""Replicates: one chain per seed (`chain.seeds=[0,1,2]`), and the chain they make together.

Each seed changes the adapter init, the matched random control sets and the data order, and runs a whole
chain of its own (its own recruits) in `seed_<s>/`. The folder's `chain.json` then holds, per round, the mean
(`metrics`) and standard deviation (`metrics_std`) of every scalar metric over the seeds that reached that
round, each seed's trajectory class, the class of the mean trajectory with noise floors widened by the seed
spread (loop/trajectory.py `seed_k`), and how many seeds agree with it. A sweep optimises the mean.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from .. import io
from .objective import learned
from .trajectory import classify

log = logging.getLogger(__name__)


def _scalars(m: dict) -> dict:
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def aggregate_rounds(chains: list[dict]) -> list[dict]:
    """Per round: mean and spread of every scalar metric over the seeds' chains that reached it."""
    out = []
    for r in range(max(len(c["rounds"]) for c in chains)):
        recs = [c["rounds"][r] for c in chains if len(c["rounds"]) > r]
        keys = sorted(set().union(*(x["metrics"] for x in recs)))
        mean, std = {}, {}
        for k in keys:
            vals = [x["metrics"][k] for x in recs if k in _scalars(x["metrics"])]
            if vals or all(x["metrics"].get(k) is None for x in recs):
                mean[k] = statistics.fmean(vals) if vals else None
                std[k] = statistics.pstdev(vals) if vals else None
        first = recs[0]
        out.append({"round": r, "suppressed": first["suppressed"], "recruits": first["recruits"],
                    "generations": first["generations"], "metrics": mean, "metrics_std": std, "seeds": len(recs)})
    return out


def _effect_spread(chains: list[dict], r: int) -> float:
    vals = [max(c["rounds"][r]["metrics"].get("final_gap") or 0.0, c["rounds"][r]["metrics"].get("behaviour_gap") or 0.0)
            for c in chains if len(c["rounds"]) > r]
    return statistics.pstdev(vals) if len(vals) > 1 else 0.0


def run_replicates(session, run_dir: Path, seeds: list[int], cache, tracker, on_round) -> dict:
    from .chain import run_chain
    base = session.cfg
    chains = []
    for s in seeds:
        cfg = OmegaConf.merge(base, {"seed": s, "chain": {"seeds": None}})
        OmegaConf.set_readonly(cfg, True)
        session.cfg = cfg
        try:
            log.info("replicate seed %d → %s", s, run_dir / f"seed_{s}")
            chains.append(run_chain(session, run_dir / f"seed_{s}", cache=cache))
        finally:
            session.cfg = base
    rounds = aggregate_rounds(chains)
    stopped = None
    for rec in rounds:
        if tracker is not None:
            tracker.log_round({**rec, "loss_curve": []})
        if on_round is not None and stopped is None:
            stopped = on_round(rec)
    th = base.chain.classify
    trajectory = classify(rounds, th, learned(rounds[0]["metrics"], base.chain.gate), base.chain.gate.get("min_task_score"),
                          spreads=[_effect_spread(chains, r) for r in range(len(rounds))])
    classes = [c["trajectory"]["class"] for c in chains]
    trajectory["seeds"] = dict(zip(map(str, seeds), classes))
    trajectory["agreement"] = sum(c == trajectory["class"] for c in classes) / len(classes)
    trajectory["reason"] += f" — {classes.count(trajectory['class'])} of {len(classes)} seeds agree"
    first = chains[0]
    chain = {**{k: first[k] for k in ("config", "baseline", "idle", "fingerprints")},
             "rounds": rounds, "stopped": stopped or first["stopped"], "trajectory": trajectory,
             "replicates": {"seeds": seeds, "dirs": [f"seed_{s}" for s in seeds], "classes": classes}}
    io.write_json(run_dir / "chain.json", chain)
    if tracker is not None:
        tracker.finish(chain)
    return chain
