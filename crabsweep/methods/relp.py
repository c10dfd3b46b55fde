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
from types import MethodType

import torch
from torch import nn

from . import METHODS, MethodConfig


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


class RelPConfig(MethodConfig):
    per_position: bool = False   # rank a unit by its best |a·∂M/∂a| at one position (the reference's ranking)
    drop_bos: bool = False       # leave position 0 out (the reference attributes positions ≥ 1 only)


class PerPosition:
    """Tap keeping a·∂M/∂a per (position, unit) of one sequence: {group: [T, n]} (float64, CPU)."""

    def __init__(self, basis):
        self.basis, self.values = basis, {}

    def __call__(self, group, x, a):
        if x.requires_grad:
            x.register_hook(lambda g, group=group, a=a: self._add(group, a, g))

    def _add(self, group, a, g):
        n, d = self.basis.sizes[group], self.basis.unit_dim
        prod = (a.float() * g.float()).reshape(a.shape[0], a.shape[1], n, d).sum(-1)[0]
        self.values[group] = prod.double().cpu()


@METHODS.register("relp", config=RelPConfig, kind="posthoc",
                  granularities=("mlp_neuron", "attention_head", "residual_dim", "dictionary_feature"),
                  adapters=None)
def run(session, acfg, mask):
    """Per unit over the train examples, M = Σ log p(target tokens): |Σ_positions a·∂M/∂a| (default), or
    max over positions of |a·∂M/∂a| (`per_position`); `drop_bos` leaves position 0 out."""
    import torch.nn.functional as F

    from ..core.tasks import collate
    basis, model = session.basis, session.model
    totals = [torch.zeros(n, dtype=torch.float64) for n in basis.sizes]
    tap = PerPosition(basis)
    v = session.adapter.n_virtual_tokens
    first = v + (1 if acfg.get("drop_bos") else 0)
    try:
        with linearized(model, session.loaded.arch), session.observe(tap):
            for ex in session.task.train:
                batch = collate([ex], session.pad_id)
                tap.values.clear()
                with session.precision():
                    logits = model(input_ids=batch["input_ids"].to(session.device)).logits[:, v:-1].float()
                target = batch["labels"].to(session.device)[:, 1:]
                keep = target != -100
                (-F.cross_entropy(logits[keep], target[keep], reduction="sum")).backward()
                for g, per_pos in tap.values.items():
                    vals = per_pos[first:]
                    totals[g] += vals.abs().max(0).values if acfg.get("per_position") else vals.sum(0)
    finally:
        model.zero_grad(set_to_none=True)
    if acfg.get("per_position"):
        return {"relp": [t.float() for t in totals]}, {}
    return {"relp": [t.abs().float() for t in totals], "relp_signed": [t.float() for t in totals]}, {}
