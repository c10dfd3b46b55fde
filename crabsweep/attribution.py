"""Attribution: per-unit scores streamed from the training pass, and the global ranking.

All methods of the training pass are captured at once, at the cost of one gradient hook per site:
  lora_a_grad  Σ_steps ‖∂L/∂A[:, j]‖₂ over the rank rows of the site's LoRA A (the reference's measure;
               zero at step 0 since B=0, and biased by B's growth).
  grad_norm    Σ_steps ‖∂L/∂a_j‖₂ over the step's tokens, a_j the site input (the seed's wording).
  grad_x_act   Σ_steps |Σ_tokens a_j·∂L/∂a_j|  (= |Σ_h W[h,j]·∂L/∂W[h,j]| for the site's effective W).
  max_grad     max_steps ‖∂L/∂a_j‖₂.
For units with unit_dim > 1 (heads), norms and sums run over the unit's features too.
Suppressed units score 0: they are excluded from ranking.
"""

from __future__ import annotations

from functools import partial
from itertools import accumulate

import torch

from .units import Unit, UnitSpace, unit_json

STREAMED = ("lora_a_grad", "grad_norm", "grad_x_act", "max_grad")


class Recorder:
    """The attribution tap: accumulates per-step statistics, folded into totals at `end_step`."""

    def __init__(self, space: UnitSpace, methods=STREAMED):
        self.space = space
        self.methods = tuple(m for m in methods if m in STREAMED)
        zeros = lambda: [torch.zeros(n, dtype=torch.float64) for n in space.sizes]  # noqa: E731
        self.totals = {m: zeros() for m in self.methods}
        self._g2 = [None] * len(space.sizes)
        self._ga = [None] * len(space.sizes)
        self.steps = 0

    def __call__(self, layer: int, a: torch.Tensor) -> None:
        a.register_hook(partial(self._on_grad, layer, a.detach()))

    def _on_grad(self, layer: int, a: torch.Tensor, g: torch.Tensor) -> None:
        gv = self.space.unit_view(g.detach(), layer).float()
        g2 = gv.pow(2).sum((0, 2))
        ga = (self.space.unit_view(a, layer).float() * gv).sum((0, 2))
        self._g2[layer] = g2 if self._g2[layer] is None else self._g2[layer] + g2
        self._ga[layer] = ga if self._ga[layer] is None else self._ga[layer] + ga

    def end_step(self) -> None:
        """Fold this step's statistics in; call after backward(), before the optimizer step."""
        for layer in range(len(self.space.sizes)):
            if "lora_a_grad" in self.methods:
                self.totals["lora_a_grad"][layer] += self.space.lora_a_grad(layer).double().cpu()
            if self._g2[layer] is None:
                continue
            norm = self._g2[layer].sqrt().double().cpu()
            if "grad_norm" in self.methods:
                self.totals["grad_norm"][layer] += norm
            if "max_grad" in self.methods:
                torch.maximum(self.totals["max_grad"][layer], norm, out=self.totals["max_grad"][layer])
            if "grad_x_act" in self.methods:
                self.totals["grad_x_act"][layer] += self._ga[layer].abs().double().cpu()
            self._g2[layer] = self._ga[layer] = None
        self.steps += 1

    def scores(self, suppressed: set[Unit]) -> dict[str, list[torch.Tensor]]:
        """Totals per method and layer (float32), suppressed units set to 0."""
        out = {m: [t.float().clone() for t in ts] for m, ts in self.totals.items()}
        for layer, index in suppressed:
            for per_layer in out.values():
                per_layer[layer][index] = 0.0
        return out


def rank(scores: list[torch.Tensor], exclude: set[Unit] = frozenset(), top: int | None = None) -> list[dict]:
    """Units ordered by score, highest first (ties: lower layer, then lower index), excluded dropped."""
    sizes = [len(s) for s in scores]
    flat = torch.cat([s.float() for s in scores])
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index_of = torch.cat([torch.arange(n) for n in sizes])
    offsets = [0, *accumulate(sizes)]
    keep = torch.ones(len(flat), dtype=torch.bool)
    for layer, index in exclude:
        keep[offsets[layer] + index] = False
    candidates = keep.nonzero().squeeze(1)
    order = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]
    if top is not None:
        order = order[:top]
    return [{"unit": unit_json((int(layer_of[i]), int(index_of[i]))), "score": float(flat[i])}
            for i in order.tolist()]
