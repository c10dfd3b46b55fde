"""Bases: where the units of a granularity live, and how values (interventions, observers) reach them.

A basis splits its units into *groups* — one per decoder layer for the per-layer granularities — and
knows each group's *site*: the module whose input (`hook="pre"`) or output (`hook="post"`) holds the
group's `sizes[g] × unit_dim` features in its last dimension. A unit is the small value
`Unit(group, index)`; the basis says which layers it spans and writes it as JSON (`{"layer", "index"}`
for the per-layer granularities, as in every record).

Registered granularities (`suppression=<name>`):
  mlp_neuron      input columns of each layer's `down_proj` (the act(gate)·up features)
  attention_head  `head_dim`-wide slices of each layer's `o_proj` input
  residual_dim    dimensions of the decoder layers' outputs, for the layers in `suppression.layers`
  moe_expert      (layer, expert) of transformers-5 fused experts; masked by a parametrization of
                  `experts.down_proj`, attributed from that weight's gradient (no per-token hook)

`apply(model, intervention)` and `observe(model, tap)` register one hook per touched site and return a
handle whose `remove()` undoes exactly that — `Session.intervene` / `Session.observe` scope them. Sites
are looked up on the model they are given, so on a PEFT-wrapped model the hook sits on the wrapper and
sees the base and adapter paths alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from ..errors import UserError
from ..registry import Registry
from .models import LoadedModel, text_config

Tap = Callable[[int, torch.Tensor, torch.Tensor], None]   # (group, x carrying the gradient, activation)
GRANULARITIES = Registry("granularity", key="suppression")


class Unit(NamedTuple):
    """A unit: its group (the layer, for per-layer granularities) and its index within the group."""

    group: int
    index: int


class Handle:
    """Undoes what a basis did to a model: removes hooks, restores state. Idempotent."""

    def __init__(self, *undo: Callable[[], None]):
        self._undo = list(undo)

    def add(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


class Positions:
    """Absolute positions of the tokens a forward pass processes (KV-cache aware, virtual tokens removed)."""

    def __init__(self, offset: int = 0):
        self.offset, self.start = offset, 0

    def attach(self, model: nn.Module, layers: nn.ModuleList) -> Handle:
        backbone = next(m for m in model.modules() if any(c is layers for c in m.children()))

        def pre(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            self.start = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        return Handle(backbone.register_forward_pre_hook(pre, with_kwargs=True).remove)

    def mask(self, x: torch.Tensor, positions: tuple[int, ...]) -> torch.Tensor:
        t = x.shape[-2]
        pos = torch.arange(self.start, self.start + t, device=x.device) - self.offset
        wanted = torch.tensor(positions, device=x.device)
        wanted = torch.where(wanted < 0, wanted + int(pos.max()) + 1, wanted) if (wanted < 0).any() else wanted
        return torch.isin(pos, wanted).unsqueeze(-1)


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    granularity: str
    mode: Literal["zero", "mean", "multiplier"] = "zero"
    scale: float = 0.0


class Basis:
    name = "abstract"
    hook: Literal["pre", "post"] = "pre"
    modes: tuple[str, ...] = ("zero", "mean", "multiplier")

    def __init__(self, loaded: LoadedModel, sizes: list[int], unit_dim: int):
        self.loaded, self.sizes, self.unit_dim = loaded, list(sizes), unit_dim
        self.device, self.dtype = loaded.device, loaded.dtype

    # -- what the units are -------------------------------------------------------------------------
    def site_of(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def sites(self, model: nn.Module) -> list[nn.Module]:
        return [self.site_of(layer) for layer in self.loaded.arch.decoder_layers(model)]

    @property
    def n_units(self) -> int:
        return sum(self.sizes)

    @property
    def groups(self) -> list[int]:
        return [g for g, n in enumerate(self.sizes) if n]

    def layers_of(self, unit: Unit) -> tuple[int, ...]:
        return (int(unit[0]),)

    def units(self) -> list[Unit]:
        return [Unit(g, i) for g, n in enumerate(self.sizes) for i in range(n)]

    def check(self, units: Iterable, what: str = "unit") -> list[Unit]:
        out = []
        for u in units:
            g, i = u
            if not (isinstance(g, int) and isinstance(i, int) and 0 <= g < len(self.sizes) and 0 <= i < self.sizes[g]):
                have = self.sizes[g] if isinstance(g, int) and 0 <= g < len(self.sizes) else 0
                raise UserError(f"{what} (layer {g}, index {i}) is out of range for {self.name} on this model "
                                f"({len(self.sizes)} layers; {have} units in that layer); fix the unit list")
            out.append(Unit(g, i))
        return out

    def unit_json(self, u) -> dict:
        return {"layer": int(u[0]), "index": int(u[1])}

    def unit_from_json(self, d) -> Unit:
        return unit_from_json(d)

    def view(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """[..., n·d] → [tokens, n, d]."""
        return x.reshape(-1, self.sizes[group], self.unit_dim)

    # -- applying values ----------------------------------------------------------------------------
    def _register(self, model: nn.Module, group: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Handle:
        site = self.sites(model)[group]
        if self.hook == "pre":
            return Handle(site.register_forward_pre_hook(lambda m, args: (fn(args[0]), *args[1:])).remove)

        def post(m, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        return Handle(site.register_forward_hook(post).remove)

    def apply(self, model: nn.Module, intervention, positions: Positions | None = None) -> Handle:
        """Register `intervention` (a value from core/interventions.py) on every group it touches."""
        handle = Handle()
        where = intervention.positions
        for g in self.groups:
            edit = intervention.compile(self, g)
            if edit is None:
                continue
            if where is not None:
                tracker = positions
                edit = (lambda e: lambda x: torch.where(tracker.mask(x, where), e(x), x))(edit)
            handle.add(self._register(model, g, edit).remove)
        return handle

    def observe(self, model: nn.Module, tap: Tap) -> Handle:
        """Call `tap(group, x, x.detach())` on every site's features; x carries ∂L/∂x (register a hook on it)."""
        handle = Handle()
        for g in self.groups:
            def fn(x, g=g):
                if torch.is_grad_enabled() and not x.requires_grad:   # nothing trainable upstream
                    x = x.detach().requires_grad_(True)
                tap(g, x, x.detach())
                return x
            handle.add(self._register(model, g, fn).remove)
        return handle

    weight_stats = None     # MoE experts: per-unit statistics from a weight gradient instead of taps


def unit_from_json(d) -> Unit:
    """`{"layer": int, "index": int}` (or a [layer, index] pair) → Unit; floats or strings are refused."""
    if isinstance(d, dict) and not {"layer", "index"} <= d.keys():
        raise UserError(f"unit {d!r} is not a {{layer, index}} unit of this granularity; fix the unit list")
    g, i = (d["layer"], d["index"]) if isinstance(d, dict) else (d[0], d[1])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (g, i)):
        raise UserError(f"unit {d!r}: layer and index must be integers")
    return Unit(g, i)


# --------------------------------------------------------------------------------------------------
@GRANULARITIES.register("mlp_neuron", config=_Config)
class MLPNeurons(Basis):
    """MLP neurons: input columns of each layer's `down_proj` (the act(gate)·up features)."""

    name = "mlp_neuron"

    def __init__(self, loaded: LoadedModel, cfg=None):
        layers = loaded.arch.decoder_layers(loaded.model)
        super().__init__(loaded, [loaded.arch.down_proj_of(layer).in_features for layer in layers], unit_dim=1)

    def site_of(self, layer):
        return self.loaded.arch.down_proj_of(layer)


@GRANULARITIES.register("attention_head", config=_Config)
class AttentionHeads(Basis):
    """Attention heads: `head_dim`-wide slices of each layer's `o_proj` input."""

    name = "attention_head"

    def __init__(self, loaded: LoadedModel, cfg=None):
        c = text_config(loaded.model.config)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n = len(loaded.arch.decoder_layers(loaded.model))
        super().__init__(loaded, [c.num_attention_heads] * n, unit_dim=head_dim)

    def site_of(self, layer):
        return self.loaded.arch.o_proj_of(layer)


class _ResidualConfig(_Config):
    layers: list[int] | None = None


@GRANULARITIES.register("residual_dim", config=_ResidualConfig)
class ResidualDims(Basis):
    """Residual-stream dimensions after the decoder layers in `suppression.layers` (negative: from the end)."""

    name = "residual_dim"
    hook = "post"

    def __init__(self, loaded: LoadedModel, cfg=None):
        n = len(loaded.arch.decoder_layers(loaded.model))
        layers = None if cfg is None else cfg.get("layers")
        for x in layers or []:
            if not -n <= int(x) < n:
                raise UserError(f"suppression.layers has layer {x}, but the model has {n} layers (0..{n - 1})")
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


@GRANULARITIES.register("moe_expert", config=_Config)
class MoEExperts(Basis):
    """MoE experts (transformers 5 fused `experts.down_proj [E, H, I]`): units are (layer, expert).

    A mask or scale multiplies the expert's `down_proj` slice (a parametrization installed once);
    attribution comes from that weight's gradient: Σ_h,j W[e,h,j]·∂L/∂W[e,h,j] = Σ_tokens Σ_j a_ej·∂L/∂a_ej."""

    name = "moe_expert"
    modes = ("zero", "multiplier")

    def __init__(self, loaded: LoadedModel, cfg=None):
        if loaded.arch.experts is None:
            raise UserError(f"suppression=moe_expert needs an MoE model; {loaded.arch.name} has no experts "
                            "(use e.g. model=tiny_moe)")
        from torch.nn.utils import parametrize
        self.experts = [getattr(loaded.arch.mlp_of(layer), loaded.arch.experts)
                        for layer in loaded.arch.decoder_layers(loaded.model)]
        for e in self.experts:
            if not parametrize.is_parametrized(e, "down_proj"):
                parametrize.register_parametrization(e, "down_proj", _ExpertMask(e.down_proj.shape[0]))
            e.parametrizations.down_proj.original.requires_grad_(True)   # read, never optimized
        super().__init__(loaded, [int(e.parametrizations.down_proj.original.shape[0]) for e in self.experts], 1)

    def site_of(self, layer):
        return getattr(self.loaded.arch.mlp_of(layer), self.loaded.arch.experts)

    def apply(self, model, intervention, positions=None) -> Handle:
        from .interventions import Mask, Scale
        if not isinstance(intervention, (Mask, Scale)) or intervention.positions is not None:
            raise UserError(f"moe_expert units take only masks and scales at every position, not "
                            f"{type(intervention).__name__}")
        factor = intervention.multiplier if isinstance(intervention, Scale) else (
            intervention.scale if intervention.mode == "multiplier" else 0.0)
        masks = [e.parametrizations.down_proj[0].m for e in self.experts]
        before = [m.clone() for m in masks]
        for g, i in intervention.units:
            masks[g][i] = masks[g][i] * factor

        def restore():
            for m, b in zip(masks, before):
                m.copy_(b)
        return Handle(restore)

    def observe(self, model, tap) -> Handle:
        return Handle()

    def weight_stats(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ (∂L/∂W_e)², Σ W_e·∂L/∂W_e) per expert, from the unmasked weight and its gradient."""
        w = self.experts[group].parametrizations.down_proj.original
        if w.grad is None:
            z = torch.zeros(self.sizes[group], device=w.device)
            return z, z
        g = w.grad.float()
        return g.pow(2).sum((1, 2)), (w.detach().float() * g).sum((1, 2))


def make_basis(scfg, loaded: LoadedModel) -> Basis:
    return GRANULARITIES.get(scfg.granularity).obj(loaded, scfg)
