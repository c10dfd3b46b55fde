"""One Crab Step round: fresh adapter + suppression set S → training with attribution → record.

A round is a pure function of (session config, S, seed): the adapter is reset with the seed, S is
applied by the unit space's mask during training, evaluation and generation, and every streamed
attribution method is captured in the same training pass.
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
from ..methods.attribution import POSTHOC, Recorder, cna, exclude, integrated_gradients, rank
from .metrics import eval_loss, generate, score_generations
from ..methods.relp import relp_scores
from ..core.session import Session
from .train import reset_adapter, train
from ..core.basis import Unit, unit_json

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

    def flat_scores(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{layer}": t for m, per_layer in self.scores.items() for layer, t in enumerate(per_layer)}

    def save_adapter(self, session: Session, dst: Path) -> None:
        if self.adapter_dir is not None:
            shutil.copytree(self.adapter_dir, dst)
        else:
            session.model.save_pretrained(str(dst))

    def record(self) -> dict:
        return {"round": self.index, "suppressed": [unit_json(u) for u in self.suppressed],
                "recruits": self.recruits, "metrics": self.metrics, "loss_curve": self.curve,
                "generations": self.generations, "timing": self.timing}


def run_round(session: Session, suppressed: list[Unit], index: int = 0, generations: bool = True) -> RoundResult:
    """Train a fresh adapter under `suppressed`; evaluate; generate (mask on, and off if eval.mask_off)."""
    cfg, task, model, space = session.cfg, session.task, session.model, session.space
    dev, pad = session.device, session.pad_id
    t0 = time.perf_counter()
    session.apply_suppression(suppressed)
    reset_adapter(model, int(cfg.seed))
    init = eval_loss(model, task.train, pad, dev, int(cfg.eval.batch_size))   # B = 0: base + mask

    recorder = Recorder(space)
    space.tap = recorder
    t_train = time.perf_counter()
    try:
        curve = train(model, task.train, cfg.train, pad, dev, int(cfg.seed), on_step_end=recorder.end_step,
                      desc=f"round {index}")
    finally:
        space.tap = None
    t_train = time.perf_counter() - t_train

    final = eval_loss(model, task.train, pad, dev, int(cfg.eval.batch_size))
    heldout = eval_loss(model, task.heldout, pad, dev, int(cfg.eval.batch_size))
    excluded = set(suppressed)
    scores = recorder.scores(excluded)
    extra = posthoc_scores(session, scores)
    exclude({m: scores[m] for m in POSTHOC if m in scores}, excluded)
    gens = []
    if generations and int(cfg.eval.max_new_tokens) > 0:
        texts = generate(model, session.tokenizer, task.heldout, dev, int(cfg.eval.max_new_tokens))
        gens = score_generations(task.heldout, texts, task.scorer, mask="on")
        if cfg.eval.mask_off and suppressed:
            space.set_suppression([])
            texts = generate(model, session.tokenizer, task.heldout, dev, int(cfg.eval.max_new_tokens))
            gens += score_generations(task.heldout, texts, task.scorer, mask="off")
            session.apply_suppression(suppressed)

    top = int(cfg.round.top)
    recruits = {m: rank(s, excluded, top) for m, s in scores.items()}
    tokens = sum(len(e.input_ids) for e in task.train) * int(cfg.train.epochs)
    metrics = {
        "init_loss": init["plain"], "final_loss": final["plain"],
        "init_loss_weighted": init["weighted"], "final_loss_weighted": final["weighted"],
        "heldout_loss": heldout["plain"], "heldout_loss_weighted": heldout["weighted"],
        "train_loss_per_sample": final["per_sample"], "heldout_loss_per_sample": heldout["per_sample"],
        "task_score": _mean_score(gens, "on"), "task_score_mask_off": _mean_score(gens, "off"),
        "n_suppressed": len(suppressed), "steps": len(curve), "train_tokens": tokens, **extra,
    }
    timing = {"train_seconds": t_train, "tokens_per_second": tokens / t_train if t_train else None,
              "seconds": time.perf_counter() - t0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    log.info("round %d: |S|=%d init %.4f → final %.4f, held-out %.4f (%.1fs)", index, len(suppressed),
             metrics["init_loss"], metrics["final_loss"], metrics["heldout_loss"] or float("nan"), timing["seconds"])
    return RoundResult(index, list(suppressed), curve, metrics, gens, scores, recruits, timing)


def posthoc_scores(session: Session, scores: dict) -> dict:
    """Add the ranking method's scores when it needs its own pass after training; return its metrics."""
    acfg = session.cfg.attribution
    if acfg.name == "integrated_gradients":
        signed, check = integrated_gradients(session, int(acfg.get("n_steps", 16)))
        scores["integrated_gradients"] = [t.abs() for t in signed]
        if check["ratio"] is not None and abs(check["ratio"] - 1) > 0.05:
            log.warning("integrated gradients completeness %.3f is off by more than 5%%; raise "
                        "attribution.n_steps", check["ratio"])
        return {"ig_completeness": check}
    if acfg.name == "cna":
        scores["cna"] = cna(session, acfg)
    elif acfg.name == "relp":
        scores["relp"] = relp_scores(session)
    return {}


def _mean_score(gens: list[dict], mask: str) -> float | None:
    scores = [g["score"] for g in gens if g["mask"] == mask]
    return sum(scores) / len(scores) if scores else None


def save_round(result: RoundResult, session: Session, target: str | Path) -> Path:
    """Write record.json, scores.safetensors and the PEFT adapter; the folder appears only when complete."""
    target = Path(target)
    with io.staged_dir(target) as tmp:
        io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
        result.save_adapter(session, tmp / "adapter")
        io.write_json(tmp / "record.json", result.record())
    return target
