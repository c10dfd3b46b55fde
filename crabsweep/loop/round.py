"""One Crab Step round: fresh adapter + suppression set S → training with attribution → record.

A round is a pure function of (session config, S, seed): the adapter is reset with the seed, S is
suppressed by a mask applied in a scope around training, evaluation and generation, and every
streamed attribution method is captured in the same training pass (the configured post-hoc method
runs after training, mask still on).
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import io
from ..core.basis import Unit
from ..methods import METHODS, exclude, rank
from ..methods.streamed import Recorder
from .metrics import eval_loss, generate, mask_costs, score_generations
from .train import train

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    index: int
    suppressed: list[Unit]
    curve: list[dict]
    metrics: dict
    generations: list[dict]
    scores: dict[str, list[torch.Tensor]] = field(repr=False)
    recruits: dict[str, list[dict]] = field(default_factory=dict)   # method → ranked top list
    timing: dict = field(default_factory=dict)                       # wall-clock facts, not reproducible
    adapter_dir: Path | None = None      # where the adapter lives when it is not the live model's (cache)
    unit_json: object = field(default=None, repr=False)

    def flat_scores(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{g}": t for m, per_group in self.scores.items() for g, t in enumerate(per_group)}

    def save_adapter(self, session, dst: Path) -> None:
        if self.adapter_dir is not None:
            shutil.copytree(self.adapter_dir, dst)
        else:
            session.adapter.save(dst)

    def add_scores(self, scores: dict, metrics: dict, top: int) -> None:
        """Merge a post-hoc method's scores (ranked into `recruits`) and metrics into this round."""
        self.scores.update(scores)
        self.metrics.update(metrics)
        for m, s in scores.items():
            if not m.endswith("_signed"):
                self.recruits[m] = rank(s, set(self.suppressed), top, basis_json=self.unit_json)

    def record(self) -> dict:
        as_json = self.unit_json or (lambda u: {"layer": int(u[0]), "index": int(u[1])})
        return {"round": self.index, "suppressed": [as_json(u) for u in self.suppressed],
                "recruits": self.recruits, "metrics": self.metrics, "loss_curve": self.curve,
                "generations": self.generations, "timing": self.timing}


def run_round(session, suppressed, index: int = 0, generations: bool = True, seed: int | None = None,
              posthoc: bool = True, label: str | None = None, mask_off: bool | None = None) -> RoundResult:
    """Train a fresh adapter under `suppressed`; evaluate (train, held-out, behaviour vs content tokens,
    damage and collateral of the mask alone); generate (mask on, and off if `mask_off`/eval.mask_off)."""
    cfg, task = session.cfg, session.task
    seed = int(cfg.seed) if seed is None else int(seed)
    suppressed = session.basis.check(suppressed)
    t0 = time.perf_counter()
    mask = session.mask(suppressed)
    session.adapter.reset(seed)
    with session.intervene(mask):
        init = eval_loss(session, task.train)          # a fresh adapter is a no-op: base + mask
        recorder = Recorder(session)
        t_train = time.perf_counter()
        with session.observe(recorder):
            curve = train(session, task.train, cfg.train, seed, on_step_end=recorder.end_step, desc=label or f"round {index}")
        t_train = time.perf_counter() - t_train
        final = eval_loss(session, task.train)
        heldout = eval_loss(session, task.heldout)
        probe = heldout if task.heldout else final      # behaviour measured on held-out samples when there are
        scores = recorder.scores(suppressed)
        gens = []
        if generations and int(cfg.eval.max_new_tokens) > 0:
            texts = generate(session, task.heldout, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
            gens = score_generations(task.heldout, texts, task.scorer, mask="on")
    mask_off = cfg.eval.mask_off if mask_off is None else mask_off
    if gens and mask_off and suppressed:
        texts = generate(session, task.heldout, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
        gens += score_generations(task.heldout, texts, task.scorer, mask="off")

    top = int(cfg.round.top)
    recruits = {m: rank(s, set(suppressed), top, basis_json=session.basis.unit_json) for m, s in scores.items()}
    tokens = sum(len(e.input_ids) for e in task.train) * int(cfg.train.epochs)
    metrics = {
        "init_loss": init["plain"], "final_loss": final["plain"],
        "init_loss_weighted": init["weighted"], "final_loss_weighted": final["weighted"],
        "heldout_loss": heldout["plain"], "heldout_loss_weighted": heldout["weighted"],
        "train_loss_per_sample": final["per_sample"], "heldout_loss_per_sample": heldout["per_sample"],
        "behaviour_ce": probe["behaviour"], "content_ce": probe["content"],
        "behaviour_split": "heldout" if task.heldout else "train",
        "task_score": _mean_score(gens, "on"), "task_score_mask_off": _mean_score(gens, "off"),
        "n_suppressed": len(suppressed), "steps": len(curve), "train_tokens": tokens,
        **mask_costs(session, suppressed, init["plain"]),
    }
    timing = {"train_seconds": t_train, "tokens_per_second": tokens / t_train if t_train else None,
              "seconds": time.perf_counter() - t0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    log.info("%s: |S|=%d init %.4f → final %.4f, held-out %s (%.1fs)", label or f"round {index}", len(suppressed),
             metrics["init_loss"], metrics["final_loss"], _fmt(metrics["heldout_loss"]), timing["seconds"])
    result = RoundResult(index, list(suppressed), curve, metrics, gens, scores, recruits, timing,
                         unit_json=session.basis.unit_json)
    if posthoc:
        result.add_scores(*posthoc_scores(session, suppressed), top=top)
    return result


def posthoc_scores(session, suppressed, adapter_dir: Path | None = None) -> tuple[dict, dict]:
    """The configured post-hoc method's scores and metrics for the live adapter (or the one in `adapter_dir`)
    under the round's mask; suppressed units score 0. Empty for a streamed method."""
    acfg = session.cfg.attribution
    entry = METHODS.get(acfg.name)
    if entry.kind != "posthoc":
        return {}, {}
    if adapter_dir is not None:
        session.adapter.load(adapter_dir)
    mask = session.mask(suppressed)
    with session.intervene(mask):
        scores, metrics = entry.obj(session, acfg, mask)
    exclude({acfg.name: scores[acfg.name]}, mask.units)
    return scores, metrics


def _mean_score(gens: list[dict], mask: str) -> float | None:
    scores = [g["score"] for g in gens if g["mask"] == mask]
    return sum(scores) / len(scores) if scores else None


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def save_round(result: RoundResult, session, target: str | Path) -> Path:
    """Write record.json, scores.safetensors and the adapter; the folder appears only when complete."""
    target = Path(target)
    with io.staged_dir(target) as tmp:
        io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
        result.save_adapter(session, tmp / "adapter")
        io.write_json(tmp / "record.json", result.record())
    return target
