"""RelP: relevance patching with the LRP rules of SEEDS.md §2, as a reversible patch of the model.

Inside `linearized(model, arch)` the forward pass is numerically unchanged, but its backward pass
follows three rules:
  LN-rule    RMSNorm(x) = x · stopgrad(rsqrt(mean(x²) + eps)) · (offset + w)   (Gemma: offset 1)
  act rule   act(gate) = gate · stopgrad(act(gate) / gate)  — σ(gate) for SiLU, Φ̃(gate) for GELU-tanh
  half rule  h = a ⊙ b with ∂h/∂a ← 0.5·g·b and ∂h/∂b ← 0.5·g·a  (a = linearized act(gate), b = up)
and attention is eager (the model config's `attn_implementation`). A unit's RelP score is
Σ_tokens a_j·∂M/∂a_j at its site, M the log-probability of the target tokens; weights are frozen.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from types import MethodType

import torch
from torch import nn


class HalfProduct(torch.autograd.Function):
    """a ⊙ b whose backward gives each factor half: (0.5·g·b, 0.5·g·a)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return 0.5 * g * b, 0.5 * g * a


def gate_factor(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) / gate, computed without dividing: σ(g) for SiLU, 0.5(1 + tanh(…)) for GELU-tanh."""
    if activation == "silu":
        return torch.sigmoid(gate)
    if activation == "gelu_tanh":
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate.pow(3))))
    raise ValueError(f"RelP has no rule for activation '{activation}'")


def _rmsnorm_forward(offset: float):
    def forward(self, x):
        eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", 1e-6)
        xf = x.float()
        factor = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
        w = self.weight.float()
        return (xf * factor * (offset + w)).to(x.dtype)
    return forward


def _mlp_forward(activation: str):
    def forward(self, x):
        gate = self.gate_proj(x)
        a = gate * gate_factor(gate, activation).detach()
        return self.down_proj(HalfProduct.apply(a, self.up_proj(x)))
    return forward


@contextmanager
def linearized(model: nn.Module, arch):
    """Patch every RMSNorm and every decoder MLP of `model` with the LRP rules; restore on exit."""
    patched = []
    try:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and getattr(module, "weight", None) is not None:
                patched.append((module, module.forward))
                module.forward = MethodType(_rmsnorm_forward(arch.norm_offset), module)
        for layer in arch.decoder_layers(model):
            mlp = arch.mlp_of(layer)
            if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
                patched.append((mlp, mlp.forward))
                mlp.forward = MethodType(_mlp_forward(arch.activation), mlp)
        yield model
    finally:
        for module, forward in patched:
            module.forward = forward


def relp_scores(session) -> list[torch.Tensor]:
    """|Σ_tokens a·∂M/∂a| per unit over the train examples, M = Σ log p(target tokens)."""
    import torch.nn.functional as F

    from .attribution import _accumulate_product
    from ..core.tasks import collate
    space, model = session.space, session.model
    totals = [torch.zeros(n, dtype=torch.float64) for n in space.sizes]

    def tap(layer, x, a):
        if x.requires_grad:
            x.register_hook(partial(_accumulate_product, space, totals, layer, a, 1.0))

    space.tap = tap
    try:
        with linearized(model, session.loaded.arch):
            for ex in session.task.train:
                batch = collate([ex], session.pad_id)
                labels = batch["labels"].to(session.device)
                logits = model(input_ids=batch["input_ids"].to(session.device)).logits[:, :-1].float()
                target = labels[:, 1:]
                keep = target != -100
                logp = -F.cross_entropy(logits[keep], target[keep], reduction="sum")
                logp.backward()
    finally:
        space.tap = None
        model.zero_grad(set_to_none=True)
    return [t.abs().float() for t in totals]
