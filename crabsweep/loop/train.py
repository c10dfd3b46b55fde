"""One round's training: the session's adapter, freshly reset, trained under the active interventions.

AdamW with torch defaults but the learning rate, cosine decay to `lr_min` stepped every step, no
clipping, epochs over the train samples in a fixed (or seeded-shuffled) order. The loss is the weighted
Σ(ce·w)/Σw when `train.weighted` (plain token-mean otherwise); both are recorded every step. A
non-finite loss stops the round with an error naming the step and learning rate.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.device import generator
from ..core.tasks import Example, collate
from ..errors import UserError

log = logging.getLogger(__name__)


def token_ce(model, batch: dict, device) -> tuple[torch.Tensor, slice]:
    """Per-token cross-entropy [B, L] of the answer region (positions `first:`) and that slice of the batch.
    Logits are only computed where labels live (`logits_to_keep`), in fp32 (fp64 stays fp64)."""
    labels = batch["labels"].to(device)
    first = int((labels != -100).int().argmax(1).min())       # earliest answer token in the batch
    keep = labels.shape[1] - first + 1                           # positions first-1 … T-1 predict them
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=keep)
    logits = out.logits[:, -keep:-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, first:], ignore_index=-100, reduction="none")
    return ce, slice(first, None)


def token_losses(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, plain loss, per-row plain loss)."""
    ce, answer = token_ce(model, batch, device)
    mask = (batch["labels"][:, answer] != -100).to(device, ce.dtype)
    w = batch["weights"][:, answer].to(device, ce.dtype)
    plain = (ce * mask).sum() / mask.sum()
    weighted = (ce * w).sum() / w.sum()
    per_row = (ce * mask).sum(1) / mask.sum(1)
    return weighted, plain, per_row


def train(session, examples: list[Example], tcfg, seed: int, on_step_end=None, desc: str = "train") -> list[dict]:
    """Train the (already reset) adapter; call `on_step_end()` after each backward. Returns the loss curve."""
    model, device = session.model, session.device
    opt = torch.optim.AdamW(session.adapter.trainable(), lr=float(tcfg.lr))
    bs = int(tcfg.batch_size)
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = int(tcfg.epochs) * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=float(tcfg.lr_min))
    curve = []
    model.train()
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    try:
        for epoch in range(int(tcfg.epochs)):
            order = list(range(len(examples)))
            if tcfg.get("shuffle"):
                order = torch.randperm(len(examples), generator=generator(seed * 1000 + epoch)).tolist()
            for s in range(steps_per_epoch):
                batch = collate([examples[i] for i in order[s * bs:(s + 1) * bs]], session.pad_id)
                with session.precision():
                    weighted, plain, _ = token_losses(model, batch, device)
                loss = weighted if tcfg.weighted else plain
                lr = sched.get_last_lr()[0]
                if not torch.isfinite(loss):
                    raise UserError(f"the training loss is {loss.item()} at step {len(curve)} (epoch {epoch}, "
                                    f"lr {lr:.3g}); lower train.lr (now {tcfg.lr})")
                loss.backward()
                if on_step_end is not None:
                    on_step_end()
                opt.step()
                sched.step()
                model.zero_grad(set_to_none=True)     # also probe gradients (MoE expert weights)
                curve.append({"step": len(curve), "epoch": epoch, "loss": loss.item(),
                              "loss_weighted": weighted.item(), "loss_plain": plain.item(), "lr": lr})
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
        model.eval()
    return curve
