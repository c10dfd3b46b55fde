"""One round's training: a fresh adapter on the frozen base, trained under the current mask.

The adapter is reset in place (same seed → same init) instead of reloading the model. AdamW with
torch defaults but the learning rate, cosine decay to `lr_min` stepped every step, no clipping,
epochs over the train samples in a fixed (or seeded-shuffled) order. The loss is the weighted
Σ(ce·w)/Σw when `train.weighted` (plain token-mean otherwise); both are recorded every step.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from ..core.device import generator, seed_everything
from ..core.tasks import Example, collate

log = logging.getLogger(__name__)


def wrap_with_lora(model, acfg):
    """PEFT-wrap the base model once; rounds then reset the adapter in place.

    Fused MoE experts get no LoRA: for transformers-5 MoE models PEFT turns MLP target names into
    parameter-LoRA on the fused experts, which would bypass the expert masks; attention keeps its LoRA."""
    targets = list(acfg.target_modules)
    if any(name.endswith(".experts") for name, _ in model.named_modules()):
        targets = [t for t in targets if t not in ("gate_proj", "up_proj", "down_proj")]
    config = LoraConfig(r=int(acfg.r), lora_alpha=float(acfg.alpha), lora_dropout=float(acfg.dropout),
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def reset_adapter(model, seed: int) -> None:
    """Re-initialize every LoRA layer exactly as a fresh adapter with this seed (A kaiming, B = 0)."""
    seed_everything(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.lora_A:
                module.reset_lora_parameters(name, True)


def token_losses(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weighted loss, plain loss, per-row plain loss). Logits are only computed where labels live."""
    labels = batch["labels"].to(device)
    first = int((labels != -100).int().argmax(1).min())       # earliest answer token in the batch
    keep = labels.shape[1] - first + 1                           # positions first-1 … T-1 predict them
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=keep)
    logits = out.logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))     # bf16 → fp32; fp64 stays
    target = labels[:, first:]
    w = batch["weights"].to(device, logits.dtype)[:, first:]
    ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    mask = (target != -100).float()
    plain = (ce * mask).sum() / mask.sum()
    weighted = (ce * w).sum() / w.sum()
    per_row = (ce * mask).sum(1) / mask.sum(1)
    return weighted, plain, per_row


def train(model, examples: list[Example], tcfg, pad_id: int, device, seed: int, on_step_end=None,
          desc: str = "train") -> list[dict]:
    """Train the (already reset) adapter; call `on_step_end()` after each backward. Returns the loss curve."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]   # only the adapter
    opt = torch.optim.AdamW(params, lr=float(tcfg.lr))
    bs = int(tcfg.batch_size)
    steps_per_epoch = math.ceil(len(examples) / bs)
    total = int(tcfg.epochs) * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=float(tcfg.lr_min))
    curve = []
    model.train()
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)
    for epoch in range(int(tcfg.epochs)):
        order = list(range(len(examples)))
        if tcfg.get("shuffle"):
            order = torch.randperm(len(examples), generator=generator(seed * 1000 + epoch)).tolist()
        for s in range(steps_per_epoch):
            batch = collate([examples[i] for i in order[s * bs:(s + 1) * bs]], pad_id)
            weighted, plain, _ = token_losses(model, batch, device)
            loss = weighted if tcfg.weighted else plain
            loss.backward()
            if on_step_end is not None:
                on_step_end()
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            model.zero_grad(set_to_none=True)     # also probe gradients (MoE expert weights)
            curve.append({"step": len(curve), "epoch": epoch, "loss": loss.item(), "loss_weighted": weighted.item(),
                          "loss_plain": plain.item(), "lr": lr})
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return curve
