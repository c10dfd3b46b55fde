"""Streamed attribution: per-unit statistics captured in the training pass itself, all at once.

  lora_a_grad  Σ_steps ‖∂L/∂A[:, j]‖₂ over the rank rows of the site's LoRA A (the reference's measure;
               zero at step 0 since B = 0, and biased by B's growth). LoRA only.
  grad_norm    Σ_steps ‖∂L/∂a_j‖₂ over the step's tokens, a_j the site's feature (the seed's wording).
  grad_x_act   Σ_steps |Σ_tokens a_j·∂L/∂a_j|  (= |Σ_h W[h,j]·∂L/∂W[h,j]| for the site's effective W).
  max_grad     max_steps ‖∂L/∂a_j‖₂.
For units with unit_dim > 1 (heads), norms and sums run over the unit's features too; MoE experts
take both statistics from their fused weight's gradient (`basis.weight_stats`).
"""

from __future__ import annotations

from functools import partial

import torch

from ..errors import UserError
from . import ALL, METHODS, MethodConfig, exclude

NAMES = ("lora_a_grad", "grad_norm", "grad_x_act", "max_grad")
for _name in NAMES:
    METHODS.register(_name, config=MethodConfig, kind="streamed",
                     granularities=("mlp_neuron", "attention_head") if _name == "lora_a_grad" else ALL,
                     adapters=("lora",) if _name == "lora_a_grad" else ALL)(_name)


def lora_a_grad(site, basis, group: int, adapter: str = "default") -> torch.Tensor:
    """Per-unit L2 norm of ∂L/∂A over the rank rows (and the unit's features) at this site."""
    lora_a = getattr(site, "lora_A", None)
    if lora_a is None or adapter not in lora_a:
        raise UserError(f"lora_a_grad needs a LoRA adapter on the {basis.name} site; "
                        "add it to adapter.target_modules or pick another attribution")
    g = lora_a[adapter].weight.grad
    if g is None:
        return torch.zeros(basis.sizes[group])
    g = g.float()
    return g.reshape(g.shape[0], basis.sizes[group], basis.unit_dim).pow(2).sum((0, 2)).sqrt()


class Recorder:
    """The training pass's tap: per-step statistics folded into totals at `end_step()`."""

    def __init__(self, session, methods=NAMES):
        self.basis = session.basis
        allowed = [e.name for e in METHODS if e.kind == "streamed"
                   and (e.granularities is ALL or self.basis.name in e.granularities)
                   and (e.adapters is ALL or session.adapter.name in e.adapters)]
        self.methods = tuple(m for m in methods if m in allowed)
        self.totals = {m: [torch.zeros(n, dtype=torch.float64) for n in self.basis.sizes] for m in self.methods}
        self._sites = self.basis.sites(session.model) if "lora_a_grad" in self.methods else None
        self._g2 = [None] * len(self.basis.sizes)
        self._ga = [None] * len(self.basis.sizes)
        self.steps = 0

    def __call__(self, group: int, x: torch.Tensor, a: torch.Tensor) -> None:
        if x.requires_grad:
            x.register_hook(partial(self._on_grad, group, a))

    def _on_grad(self, group: int, a: torch.Tensor, g: torch.Tensor) -> None:
        gv = self.basis.view(g.detach(), group).float()
        g2 = gv.pow(2).sum((0, 2))
        ga = (self.basis.view(a, group).float() * gv).sum((0, 2))
        self._g2[group] = g2 if self._g2[group] is None else self._g2[group] + g2
        self._ga[group] = ga if self._ga[group] is None else self._ga[group] + ga

    def end_step(self) -> None:
        """Fold this step's statistics in; call after backward(), before the optimizer step."""
        for group in self.basis.groups:
            if "lora_a_grad" in self.methods:
                self.totals["lora_a_grad"][group] += lora_a_grad(self._sites[group], self.basis, group).double().cpu()
            if self.basis.weight_stats is not None:
                self._g2[group], self._ga[group] = self.basis.weight_stats(group)
            if self._g2[group] is None:
                continue
            norm = self._g2[group].sqrt().double().cpu()
            if "grad_norm" in self.methods:
                self.totals["grad_norm"][group] += norm
            if "max_grad" in self.methods:
                torch.maximum(self.totals["max_grad"][group], norm, out=self.totals["max_grad"][group])
            if "grad_x_act" in self.methods:
                self.totals["grad_x_act"][group] += self._ga[group].abs().double().cpu()
            self._g2[group] = self._ga[group] = None
        self.steps += 1

    def scores(self, suppressed) -> dict[str, list[torch.Tensor]]:
        """Totals per method and group (float32), suppressed units set to 0."""
        return exclude({m: [t.float().clone() for t in ts] for m, ts in self.totals.items()}, suppressed)
