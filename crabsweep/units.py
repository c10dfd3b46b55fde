"""Unit spaces: where the units of a granularity live, how they are captured and suppressed.

Every granularity is a `UnitSpace`: one *site* module per layer whose input's last dimension is
`n_units × unit_dim` features (an MLP neuron is one input column of `down_proj`, unit_dim 1; an
attention head is `head_dim` input columns of `o_proj`). One forward pre-hook per site, registered on
the **PEFT-wrapped** module so that the base path and the LoRA path both see it, does both jobs:

    x ← x · α + β          suppression: α, β per feature, set from the suppressed units and the mode
    tap(layer, x)          capture: the attribution recorder registers a gradient hook on x

Suppression modes (`suppression.mode`): `zero` (α=0), `multiplier` (α=scale: 0 ablates, 1 is a no-op,
>1 amplifies, <0 flips) and `mean` (α=0, β=the unit's mean activation, given by the caller).
A unit is `(layer, index)`, recorded as `{"layer": int, "index": int}`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

from .errors import UserError
from .models import LoadedModel, text_config

Unit = tuple[int, int]
Tap = Callable[[int, torch.Tensor], None]
MODES = ("zero", "mean", "multiplier")


def unit_json(u: Unit) -> dict:
    return {"layer": int(u[0]), "index": int(u[1])}


def unit_from_json(d) -> Unit:
    return (int(d["layer"]), int(d["index"]))


class UnitSpace(ABC):
    """A granularity: per-layer site modules whose input features group into units."""

    name = "abstract"
    supports = ("lora_a_grad", "grad_norm", "grad_x_act")   # attribution methods defined for it

    def __init__(self, loaded: LoadedModel, sizes: list[int], unit_dim: int):
        self.loaded = loaded
        self.sizes = sizes
        self.unit_dim = unit_dim
        self.tap: Tap | None = None
        self._alpha: list[torch.Tensor | None] = [None] * len(sizes)
        self._beta: list[torch.Tensor | None] = [None] * len(sizes)
        self._handles: list = []
        self._sites: list[nn.Module] = []

    # -- what the units are ------------------------------------------------------------------------
    @abstractmethod
    def site_of(self, layer: nn.Module) -> nn.Module:
        """The module whose input holds this layer's units."""

    @property
    def n_units(self) -> int:
        return sum(self.sizes)

    def check(self, units: Iterable[Unit], what: str = "unit") -> None:
        for layer, index in units:
            if not (0 <= layer < len(self.sizes) and 0 <= index < self.sizes[layer]):
                raise UserError(f"{what} (layer {layer}, index {index}) is out of range for {self.name} on this "
                                f"model ({len(self.sizes)} layers × {self.sizes[0]} units); fix the unit list")

    # -- hooks -------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Register one pre-hook per site on `model` (call after PEFT wrapping)."""
        self.remove()
        self._sites = [self.site_of(layer) for layer in self.loaded.arch.decoder_layers(model)]
        for i, site in enumerate(self._sites):
            self._handles.append(site.register_forward_pre_hook(partial(self._pre_hook, i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, layer: int, module: nn.Module, args: tuple):
        x = args[0]
        alpha = self._alpha[layer]
        if alpha is not None:
            x = x * alpha + self._beta[layer] if self._beta[layer] is not None else x * alpha
        if self.tap is not None and torch.is_grad_enabled():
            if not x.requires_grad:   # nothing trainable upstream: the gradient at x is still defined
                x = x.detach().requires_grad_(True)
            self.tap(layer, x)
        return (x, *args[1:])

    # -- suppression -------------------------------------------------------------------------------
    def set_suppression(self, units: Iterable[Unit], mode: str = "zero", scale: float = 0.0,
                        means: list[torch.Tensor] | None = None) -> None:
        """Suppress `units` from now on (replaces any earlier set). An empty set removes the mask."""
        if mode not in MODES:
            raise UserError(f"unknown suppression.mode '{mode}'; choose from {', '.join(MODES)}")
        units = list(units)
        self.check(units)
        by_layer: dict[int, list[int]] = {}
        for layer, index in units:
            by_layer.setdefault(layer, []).append(index)
        dev, dt = self.loaded.device, self.loaded.dtype
        self._alpha = [None] * len(self.sizes)
        self._beta = [None] * len(self.sizes)
        for layer, idx in by_layer.items():
            s = torch.zeros(self.sizes[layer], dtype=torch.float32)
            s[idx] = 1.0
            factor = scale if mode == "multiplier" else 0.0
            alpha = 1.0 - s + factor * s
            self._alpha[layer] = alpha.repeat_interleave(self.unit_dim).to(dev, dt)
            if mode == "mean":
                if means is None:
                    raise UserError("suppression.mode=mean needs the units' mean activations")
                beta = means[layer].float().reshape(self.sizes[layer], self.unit_dim) * s[:, None]
                self._beta[layer] = beta.flatten().to(dev, dt)

    # -- views used by attribution -----------------------------------------------------------------
    def unit_view(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """[..., n·d] → [tokens, n, d]."""
        return x.reshape(-1, self.sizes[layer], self.unit_dim)

    def lora_a_grad(self, layer: int, adapter: str = "default") -> torch.Tensor:
        """Per-unit L2 norm of ∂L/∂A over the rank rows (and the unit's features) at this site."""
        lora_a = getattr(self._sites[layer], "lora_A", None)
        if lora_a is None or adapter not in lora_a or lora_a[adapter].weight.grad is None:
            raise UserError(f"lora_a_grad needs a LoRA adapter on the {self.name} site; "
                            f"add it to adapter.target_modules or pick another attribution")
        g = lora_a[adapter].weight.grad.float()            # [r, n·d]
        return g.reshape(g.shape[0], self.sizes[layer], self.unit_dim).pow(2).sum((0, 2)).sqrt()


class MLPNeurons(UnitSpace):
    """MLP neurons: input columns of each layer's `down_proj` (the act(gate)·up features)."""

    name = "mlp_neuron"

    def __init__(self, loaded: LoadedModel):
        layers = loaded.arch.decoder_layers(loaded.model)
        sizes = [loaded.arch.down_proj_of(layer).in_features for layer in layers]
        super().__init__(loaded, sizes, unit_dim=1)

    def site_of(self, layer):
        return self.loaded.arch.down_proj_of(layer)


class AttentionHeads(UnitSpace):
    """Attention heads: `head_dim`-wide slices of each layer's `o_proj` input."""

    name = "attention_head"

    def __init__(self, loaded: LoadedModel):
        cfg = text_config(loaded.model.config)
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        n = len(loaded.arch.decoder_layers(loaded.model))
        super().__init__(loaded, [heads] * n, unit_dim=head_dim)

    def site_of(self, layer):
        return self.loaded.arch.o_proj_of(layer)


SPACES: dict[str, type[UnitSpace]] = {"mlp_neuron": MLPNeurons, "attention_head": AttentionHeads}


def make_space(scfg, loaded: LoadedModel) -> UnitSpace:
    if scfg.granularity not in SPACES:
        raise UserError(f"unknown suppression granularity '{scfg.granularity}'; choose from {sorted(SPACES)}")
    return SPACES[scfg.granularity](loaded)
