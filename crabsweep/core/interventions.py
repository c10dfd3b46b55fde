"""Interventions are values; a basis applies them in a scope.

An intervention says *what* happens to some units, never *where* they live (that is the basis's
job, core/basis.py). It is a frozen value — build it, pass it around, apply it:

    with session.intervene(session.mask(S), Scale(T, 4.0)):      # suppress S and amplify T
        ...                                                        # hooks removed on exit, even on error

Applied in order, they compose (each sees the previous one's output). The feature-column
granularities (MLP neurons, attention heads, residual dims) compile them to one function per touched
group acting on the site's feature tensor x [..., n_units · unit_dim]:

  Mask(units, mode, scale, means)   zero | mean | multiplier:  x_j ← 0 | mean_j | scale·x_j
  Scale(units, multiplier)          x_j ← m·x_j  (0 ablates, 1 is a no-op, >1 amplifies, <0 flips)
  Add(group, vector, alpha)         x ← x + α·v  (an additive steering vector, e.g. CAA)
  IGPath(t, baseline, record)       x ← b + t·(x − b), b = `baseline` applied to x; `record(g, x_t, x − b)`
                                    lets integrated gradients collect ∂L/∂x_t along the path
Any of them may be restricted to token positions (`positions`, absolute in the sequence).
Other bases (MoE experts, dictionaries) interpret the same values their own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .basis import Unit

Edit = Callable[[torch.Tensor], torch.Tensor]
MODES = ("zero", "mean", "multiplier")


def _by_group(units) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for g, i in units:
        out.setdefault(int(g), []).append(int(i))
    return out


@dataclass(frozen=True)
class Intervention:
    positions: tuple[int, ...] | None = field(default=None, kw_only=True)   # None: every position

    def groups(self) -> set[int]:
        return set()

    def compile(self, basis, group: int) -> Edit | None:
        """The edit of group `group`'s feature tensor, or None if this group is untouched."""
        raise NotImplementedError


def _affine(basis, group: int, idx: list[int], alpha_value: float, beta: torch.Tensor | None = None):
    """Per-feature α (1 outside `idx`) and β for one group, on the basis's device and dtype."""
    n, d = basis.sizes[group], basis.unit_dim
    sel = torch.zeros(n, dtype=torch.float32)
    sel[idx] = 1.0
    alpha = (1.0 - sel + alpha_value * sel).repeat_interleave(d)
    if beta is not None:
        beta = (beta.float().reshape(n, d) * sel[:, None]).flatten()
    return alpha.to(basis.device, basis.dtype), (None if beta is None else beta.to(basis.device, basis.dtype))


@dataclass(frozen=True)
class Mask(Intervention):
    """Suppress `units`: mode zero (x←0), mean (x←the unit's mean, `means[group]`), multiplier (x←scale·x)."""

    units: tuple[Unit, ...] = ()
    mode: str = "zero"
    scale: float = 0.0
    means: Sequence[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mask mode {self.mode!r} is not one of {MODES}")
        if self.mode == "mean" and self.means is None:
            raise ValueError("a mean mask needs the units' mean activations")

    def groups(self) -> set[int]:
        return {int(g) for g, _ in self.units}

    def compile(self, basis, group):
        idx = _by_group(self.units).get(group)
        if not idx:
            return None
        factor = self.scale if self.mode == "multiplier" else 0.0
        beta = self.means[group] if self.mode == "mean" else None
        alpha, beta = _affine(basis, group, idx, factor, beta)
        if beta is None:
            return lambda x: x * alpha
        return lambda x: x * alpha + beta

    def complement(self, basis) -> "Mask":
        """The same mask on every *other* unit of the basis (the baseline of an IG path)."""
        taken = set(map(tuple, self.units))
        rest = tuple(Unit(g, i) for g, n in enumerate(basis.sizes) for i in range(n) if (g, i) not in taken)
        return Mask(rest, self.mode, self.scale, self.means, positions=self.positions)


@dataclass(frozen=True)
class Scale(Intervention):
    """Multiply `units` by `multiplier` (the neural-steering reference's steering)."""

    units: tuple[Unit, ...] = ()
    multiplier: float = 1.0

    def groups(self) -> set[int]:
        return {int(g) for g, _ in self.units}

    def compile(self, basis, group):
        idx = _by_group(self.units).get(group)
        if not idx:
            return None
        alpha, _ = _affine(basis, group, idx, float(self.multiplier))
        return lambda x: x * alpha


@dataclass(frozen=True)
class Add(Intervention):
    """Add α·`vector` to group `group`'s features (a steering vector, e.g. contrastive activation addition)."""

    group: int = 0
    vector: torch.Tensor | None = field(default=None, repr=False, compare=False)
    alpha: float = 1.0

    def groups(self) -> set[int]:
        return {self.group}

    def compile(self, basis, group):
        if group != self.group:
            return None
        v = (self.alpha * self.vector.float()).to(basis.device, basis.dtype)
        return lambda x: x + v


@dataclass(frozen=True)
class IGPath(Intervention):
    """A point t of the integrated-gradients path b + t·(x − b), with b = `baseline` applied to x.

    `record(group, x_t, x − b)` is called with the path point (which carries the gradient) and the
    detached difference, so integrated gradients can accumulate (x − b)·∂L/∂x_t."""

    t: float = 1.0
    baseline: Intervention | None = None
    record: Callable[[int, torch.Tensor, torch.Tensor], None] | None = field(default=None, compare=False)
    all_groups: tuple[int, ...] = ()

    def groups(self) -> set[int]:
        return set(self.all_groups)

    def compile(self, basis, group):
        if group not in self.all_groups:
            return None
        base = self.baseline.compile(basis, group) if self.baseline is not None else None
        t, record = float(self.t), self.record

        def edit(x):
            b = base(x) if base is not None else torch.zeros_like(x)
            delta = (x - b).detach()
            xt = b + t * (x - b)
            if record is not None:
                if torch.is_grad_enabled() and not xt.requires_grad:
                    xt = xt.detach().requires_grad_(True)
                record(group, xt, delta)
            return xt
        return edit
