"""Unit spaces: where the units of a granularity live, how they are captured and suppressed.

Every granularity is a `UnitSpace`: one *site* module per layer whose input (or, for residual dims,
output) has `n_units × unit_dim` features in its last dimension (an MLP neuron is one input column of
`down_proj`, unit_dim 1; an attention head is `head_dim` input columns of `o_proj`; a residual dim is
one feature of a decoder layer's output). One hook per site — a forward pre-hook registered on the
**PEFT-wrapped** module, so that the base path and the LoRA path both see it — does every job:

    x ← x · α + β               suppression: α, β per feature, from the suppressed units and the mode
    x ← b + t·(x − b)           an integrated-gradients path point t, b the units' suppressed values
    tap(layer, x, δ)            capture: activation (δ = x, or x − b on a path) and, via a gradient
                                hook on x, ∂L/∂x — for every attribution method
MoE experts are fused 3-D parameters that no hook can split: `MoEExperts` masks each expert's
`down_proj` slice through a parametrization and reads its statistics from that weight's gradient.

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

from ..errors import UserError
from .models import LoadedModel, text_config

Unit = tuple[int, int]
Tap = Callable[[int, torch.Tensor, torch.Tensor], None]
MODES = ("zero", "mean", "multiplier")


def unit_json(u: Unit) -> dict:
    return {"layer": int(u[0]), "index": int(u[1])}


def unit_from_json(d) -> Unit:
    return (int(d["layer"]), int(d["index"]))


class UnitSpace(ABC):
    """A granularity: per-layer site modules whose input features group into units."""

    name = "abstract"
    hook = "pre"                     # the units are the site's input ("pre") or output ("post")
    supports = ("lora_a_grad", "grad_norm", "grad_x_act", "max_grad", "integrated_gradients", "cna", "relp")
    modes = ("zero", "mean", "multiplier")

    def __init__(self, loaded: LoadedModel, sizes: list[int], unit_dim: int):
        self.loaded = loaded
        self.sizes = sizes
        self.unit_dim = unit_dim
        self.tap: Tap | None = None
        self.path: float | None = None      # integrated-gradients path point t in [0, 1]
        self.mode, self.scale, self.means = "zero", 0.0, None
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
                have = self.sizes[layer] if 0 <= layer < len(self.sizes) else 0
                raise UserError(f"{what} (layer {layer}, index {index}) is out of range for {self.name} on this "
                                f"model ({len(self.sizes)} layers; {have} units in that layer); fix the unit list")

    # -- hooks -------------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        """Register one pre-hook per site on `model` (call after PEFT wrapping)."""
        self.remove()
        self._sites = [self.site_of(layer) for layer in self.loaded.arch.decoder_layers(model)]
        for i, site in enumerate(self._sites):
            if not self.sizes[i]:
                continue
            if self.hook == "pre":
                self._handles.append(site.register_forward_pre_hook(partial(self._pre_hook, i)))
            else:
                self._handles.append(site.register_forward_hook(partial(self._post_hook, i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, layer: int, module: nn.Module, args: tuple):
        return (self._transform(layer, args[0]), *args[1:])

    def _post_hook(self, layer: int, module: nn.Module, args: tuple, out):
        if isinstance(out, tuple):
            return (self._transform(layer, out[0]), *out[1:])
        return self._transform(layer, out)

    def _transform(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        x = raw
        alpha = self._alpha[layer]
        if alpha is not None:
            x = x * alpha + self._beta[layer] if self._beta[layer] is not None else x * alpha
        delta = None
        if self.path is not None:         # b + t·(x − b), b = every unit at its suppressed value
            b = self._suppressed_value(layer, raw)
            delta = (x - b).detach()
            x = b + self.path * (x - b)
        if self.tap is not None:
            if torch.is_grad_enabled() and not x.requires_grad:   # nothing trainable upstream
                x = x.detach().requires_grad_(True)
            self.tap(layer, x, x.detach() if delta is None else delta)
        return x

    def _suppressed_value(self, layer: int, raw: torch.Tensor) -> torch.Tensor:
        if self.mode == "multiplier":
            return raw * self.scale
        if self.mode == "mean":
            return self.means[layer].to(raw.dtype).expand_as(raw)
        return torch.zeros_like(raw)

    # -- suppression -------------------------------------------------------------------------------
    def set_suppression(self, units: Iterable[Unit], mode: str = "zero", scale: float = 0.0,
                        means: list[torch.Tensor] | None = None) -> None:
        """Suppress `units` from now on (replaces any earlier set). An empty set removes the mask."""
        if mode not in self.modes:
            raise UserError(f"suppression.mode={mode} is not defined for {self.name}; choose from {', '.join(self.modes)}")
        if mode == "mean" and means is None:
            raise UserError("suppression.mode=mean needs the units' mean activations")
        self.mode, self.scale, self.means = mode, float(scale), means
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


class ResidualDims(UnitSpace):
    """Residual-stream dimensions after the decoder layers in `suppression.layers` (the layer's output)."""

    name = "residual_dim"
    hook = "post"
    supports = ("grad_norm", "grad_x_act", "max_grad", "integrated_gradients", "cna", "relp")

    def __init__(self, loaded: LoadedModel, layers):
        n = len(loaded.arch.decoder_layers(loaded.model))
        chosen = set(range(n)) if layers is None else {int(x) % n for x in layers}
        hidden = text_config(loaded.model.config).hidden_size
        super().__init__(loaded, [hidden if i in chosen else 0 for i in range(n)], unit_dim=1)

    def site_of(self, layer):
        return layer


class _ExpertMask(nn.Module):
    """Parametrization W ↦ W · m[e]: expert e's down_proj slice scaled by its mask value."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.register_buffer("m", torch.ones(n_experts))

    def forward(self, w):
        return w * self.m.to(w.dtype)[:, None, None]


class MoEExperts(UnitSpace):
    """MoE experts (transformers 5 fused `experts.down_proj [E, H, I]`): units are (layer, expert).

    Suppression masks the expert's `down_proj` slice; attribution comes from that weight's gradient:
    Σ_h,j W[e,h,j]·∂L/∂W[e,h,j] = Σ_tokens Σ_j a_ej·∂L/∂a_ej (grad × activation of the expert)."""

    name = "moe_expert"
    supports = ("grad_norm", "grad_x_act", "max_grad")
    modes = ("zero", "multiplier")

    def __init__(self, loaded: LoadedModel):
        if loaded.arch.experts is None:
            raise UserError(f"suppression=moe_expert needs an MoE model; {loaded.arch.name} has no experts "
                            "(use e.g. model=tiny_moe)")
        self.experts = [getattr(loaded.arch.mlp_of(layer), loaded.arch.experts)
                        for layer in loaded.arch.decoder_layers(loaded.model)]
        super().__init__(loaded, [int(e.down_proj.shape[0]) for e in self.experts], unit_dim=1)

    def site_of(self, layer):
        return getattr(self.loaded.arch.mlp_of(layer), self.loaded.arch.experts)

    def install(self, model: nn.Module) -> None:
        from torch.nn.utils import parametrize
        for e in self.experts:
            if not parametrize.is_parametrized(e, "down_proj"):
                parametrize.register_parametrization(e, "down_proj", _ExpertMask(e.down_proj.shape[0]))
            e.parametrizations.down_proj.original.requires_grad_(True)   # read, never optimized

    def _masks(self):
        return [e.parametrizations.down_proj[0].m for e in self.experts]

    def set_suppression(self, units, mode="zero", scale=0.0, means=None) -> None:
        if mode not in self.modes:
            raise UserError(f"suppression.mode={mode} is not defined for moe_expert; choose zero or multiplier")
        units = list(units)
        self.check(units)
        self.mode, self.scale = mode, float(scale)
        for m in self._masks():
            m.fill_(1.0)
        for layer, index in units:
            self._masks()[layer][index] = self.scale if mode == "multiplier" else 0.0

    def weight_stats(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ (∂L/∂W_e)², Σ W_e·∂L/∂W_e) per expert, from the unmasked weight and its gradient."""
        w = self.experts[layer].parametrizations.down_proj.original
        if w.grad is None:
            z = torch.zeros(self.sizes[layer], device=w.device)
            return z, z
        g = w.grad.float()
        return g.pow(2).sum((1, 2)), (w.detach().float() * g).sum((1, 2))

    def lora_a_grad(self, layer: int, adapter: str = "default") -> torch.Tensor:
        raise UserError("lora_a_grad is not defined for moe_expert (fused experts carry no LoRA)")


SPACES: dict[str, type[UnitSpace]] = {"mlp_neuron": MLPNeurons, "attention_head": AttentionHeads,
                                      "residual_dim": ResidualDims, "moe_expert": MoEExperts}


def make_space(scfg, loaded: LoadedModel) -> UnitSpace:
    if scfg.granularity not in SPACES:
        raise UserError(f"unknown suppression granularity '{scfg.granularity}'; choose from {sorted(SPACES)}")
    if scfg.granularity == "residual_dim":
        return ResidualDims(loaded, scfg.get("layers"))
    return SPACES[scfg.granularity](loaded)
