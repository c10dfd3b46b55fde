"""Editing a model through a dictionary: the seed's three ablations, steering and clamping.

Values (frozen, applied in a scope like every crabsweep intervention — `session.intervene(...)`):

  Ablate(units, method, scale, layer, lr, steps, propagate)   remove features i ∈ units:
      single_layer  x_l ← x_l − s·f_i·d_i^(l) at one layer l           (s = `scale`; "auto": 1/(w_i·d_i))
      many_layer    the same at every layer the dictionary decodes to
      perturbation  x_l ← x_l + δ_l at every dictionary layer, δ found by `steps` steps of gradient descent
                    on ½Σ f_i(x + δ)² (step lr/‖w_i‖², so lr = 1 removes a lone linear feature in one step);
                    `propagate`: each step re-runs the model so δ_l also moves the later layers' inputs
  Steer(units, alpha, layer)      x_l ← x_l + α·d_i^(l) at `layer` (None: every dictionary layer)
  Clamp(units, target, lr, steps, propagate)   perturbation driving the pre-activations to `target`
The generic values mean: Mask → Ablate with the suppression config's method (Mask.scale = s),
Scale(units, m) → f_i ← m·f_i through the decoder, Add(group, v, α) → x_l += α·v@W_dec[:, l].

Every edit keeps the dictionary's error term: x is changed only by the edited features' decoder terms
(or δ), so "no edit" (s = 0, a feature that is off, 0 steps) leaves x bitwise unchanged.

A dictionary over several layers (a crosscoder) reads all of them before writing any, so its edits run
a first pass — the same forward call with every dictionary edit and observer off, stopped after the
last dictionary layer, KV cache restored — then the real pass writes the edits (and each `propagate`
step is one more such pass). Under a KV cache (generation), the first pass of each new token sees the
edited past. Gradients flow through f (the ablated model is a function); δ is a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..core.basis import Handle, Unit
from ..core.interventions import Intervention
from ..errors import UserError
from . import sites

METHODS = ("single_layer", "many_layer", "perturbation")


def _dictionary_only(value) -> UserError:
    return UserError(f"{type(value).__name__} edits dictionary features; use it with suppression=dictionary_feature")


@dataclass(frozen=True)
class Ablate(Intervention):
    units: tuple[Unit, ...] = ()
    method: str = "single_layer"
    scale: float | str = 1.0
    layer: int | None = None
    lr: float = 1.0
    steps: int = 15
    propagate: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"ablation method '{self.method}' is not one of {', '.join(METHODS)}")

    def compile(self, basis, group):
        raise _dictionary_only(self)


@dataclass(frozen=True)
class Steer(Intervention):
    units: tuple[Unit, ...] = ()
    alpha: float = 1.0
    layer: int | None = None

    def compile(self, basis, group):
        raise _dictionary_only(self)


@dataclass(frozen=True)
class Clamp(Intervention):
    units: tuple[Unit, ...] = ()
    target: float = 0.0
    lr: float = 1.0
    steps: int = 15
    propagate: bool = True

    def compile(self, basis, group):
        raise _dictionary_only(self)


@dataclass
class Edit:
    """One value's effect on one dictionary (group): which features, which slots, and how."""

    group: int
    idx: torch.Tensor                         # feature indices [S]
    slots: tuple[int, ...]                    # dictionary slots written
    factor: torch.Tensor | None = None        # decoder edit: coefficient = f_S · factor
    const: torch.Tensor | None = None         # steering: coefficient = const (no f needed)
    solve: dict | None = None                 # perturbation: target (None: ablate), lr, steps, propagate


class _FeatureGrad(torch.autograd.Function):
    """Identity on x whose backward also hands ∂L/∂f = ∂L/∂x · W_decᵀ to the feature tensor f."""

    @staticmethod
    def forward(ctx, x, f, w_dec):
        ctx.save_for_backward(w_dec)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g, g.float() @ w.T, None


def feature_grad(x: torch.Tensor, f: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    return _FeatureGrad.apply(x, f, w_dec)


def objective(dic, xs: torch.Tensor, idx: torch.Tensor, target: float | None, mask) -> torch.Tensor:
    """½Σ f_S² (ablation) or ½Σ (pre_S − target)² (clamping) over the (masked) tokens."""
    pre = dic.pre(xs)
    val = dic.act(pre)[..., idx] if target is None else pre[..., idx] - target
    if mask is not None:
        val = val * mask
    return 0.5 * val.pow(2).sum()


# --------------------------------------------------------------------------------------------------
def _snapshot(cache):
    """What a pass may change in a (dynamic) KV cache; restored afterwards so the pass leaves no trace."""
    if cache is None or not hasattr(cache, "layers"):
        return None
    for layer in cache.layers:
        if "Static" in type(layer).__name__ or "Offloaded" in type(layer).__name__:
            raise UserError(f"crosscoder edits cannot rewind a {type(layer).__name__} KV cache; generate with "
                            "the default dynamic cache")
    return cache, dict(vars(cache)), list(cache.layers), [(layer, dict(vars(layer))) for layer in cache.layers]


def _restore(snap) -> None:
    if snap is None:
        return
    cache, state, layers, per_layer = snap
    for layer, st in per_layer:
        vars(layer).clear()
        vars(layer).update(st)
    vars(cache).clear()
    vars(cache).update(state)
    cache.layers = layers


class Runner:
    """An Edit installed on a model: site hooks, and for multi-layer dictionaries the first pass."""

    def __init__(self, basis, model, edit: Edit, positions=None, where=None):
        self.basis, self.model, self.edit = basis, model, edit
        self.dic = basis.dictionaries[edit.group]
        self.arch = basis.loaded.arch
        self.positions, self.where = positions, where
        self.local = self.dic.n_layers == 1
        self.deltas: dict[int, torch.Tensor] = {}
        self.trial: list | None = None

    def install(self) -> Handle:
        handle = Handle()
        if not self.local and (self.edit.factor is not None or self.edit.solve is not None):
            backbone = sites.backbone_of(self.model, self.arch)
            handle.add(backbone.register_forward_pre_hook(self._prepare, with_kwargs=True).remove)
        slots = range(self.dic.n_layers) if self.edit.solve is not None else self.edit.slots
        for slot in slots:
            handle.add(sites.hook(self.model, self.arch, self.dic.sites[slot], partial(self._write, slot)).remove)
        return handle

    # -- the pass that writes ------------------------------------------------------------------------
    def _write(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        owner = self.basis.inner
        if owner is not None:                        # a first pass: only its owner's trial δ is on
            if owner is not self or self.trial is None:
                return x
            if self.trial[slot] is None:
                self.trial[slot] = torch.zeros(x.shape, device=x.device).requires_grad_(True)
            return x + self.trial[slot].to(x.dtype)
        e = self.edit
        if e.const is not None:
            delta = self._mask(x, (e.const @ self.dic.W_dec[e.idx, slot]).expand(x.shape))
        elif self.local:
            delta = self._local(x)
        else:
            delta = self.deltas.get(slot)
            if delta is None:
                return x
        return x + delta.to(x.dtype)

    def _mask(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return delta if self.where is None else delta * self.positions.mask(x, self.where)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """A one-layer dictionary: everything is computed from x at its site, in this pass."""
        e = self.edit
        xs = x.unsqueeze(-2)
        if e.solve is None:
            f = self.dic.encode(xs)
            return self._mask(x, (f[..., e.idx] * e.factor) @ self.dic.W_dec[e.idx, 0])
        return self._solve(None, None, None, xs.detach().float())[0]

    # -- the first pass (multi-layer dictionaries) ---------------------------------------------------
    def _pass(self, module, args, kwargs, trial=None) -> torch.Tensor:
        """Run the backbone again with dictionary edits off (but `trial` δ), up to the last dictionary site."""
        seen, handle = sites.capture(self.model, self.arch, list(self.dic.sites))
        snap = _snapshot(kwargs.get("past_key_values"))
        self.basis.inner, self.trial = self, trial
        try:
            module(*args, **kwargs)
        except sites.Stop:
            pass
        finally:
            handle.remove()
            self.basis.inner, self.trial = None, None
            _restore(snap)
        return torch.stack([seen[s] for s in self.dic.sites], dim=-2).float()

    def _prepare(self, module, args, kwargs):
        if self.basis.inner is not None:
            return None
        e = self.edit
        if e.solve is not None:
            with torch.no_grad():
                xs0 = None if e.solve["propagate"] else self._pass(module, args, kwargs)
            deltas = self._solve(module, args, kwargs, xs0)
        else:
            xs = self._pass(module, args, kwargs)
            coef = self.dic.encode(xs)[..., e.idx] * e.factor
            deltas = [None] * self.dic.n_layers
            for slot in e.slots:
                deltas[slot] = self._mask(xs[..., slot, :], coef @ self.dic.W_dec[e.idx, slot])
        self.deltas = {s: d for s, d in enumerate(deltas) if d is not None}
        return None

    def _solve(self, module, args, kwargs, xs0) -> list:
        """Gradient descent on per-slot δ: encoder-only on fixed activations `xs0`, or (xs0 None) each step
        a pass through the model with the trial δ added, so δ_l also moves the later layers' inputs."""
        e, dic = self.edit, self.dic
        s = e.solve
        nu = dic.W_enc[:, :, e.idx].pow(2).sum((0, 1)).max().clamp_min(1e-12)
        step = float(s["lr"]) / float(nu)
        deltas = [None] * dic.n_layers if xs0 is None else [torch.zeros_like(xs0[..., i, :]) for i in range(dic.n_layers)]
        mask = None
        with torch.enable_grad():
            for _ in range(int(s["steps"])):
                trial = [None if d is None else d.requires_grad_(True) for d in deltas]
                if xs0 is None:
                    xs = self._pass(module, args, kwargs, trial)          # fills in the trial δ it creates
                else:
                    xs = xs0 + torch.stack(trial, dim=-2)
                if mask is None and self.where is not None:
                    mask = self.positions.mask(xs[..., 0, :], self.where).float()
                loss = objective(dic, xs, e.idx, s["target"], mask)
                if not loss.requires_grad:               # nothing left to move
                    deltas = trial
                    break
                grads = torch.autograd.grad(loss, trial, allow_unused=True)
                deltas = [(d if g is None else d - step * (g if mask is None else g * mask)).detach()
                          for d, g in zip(trial, grads)]
        return [None if d is None else d.detach() for d in deltas]


def install(basis, model, edits: list[Edit], positions=None, where=None) -> Handle:
    handle = Handle()
    for edit in edits:
        handle.add(Runner(basis, model, edit, positions, where).install().remove)
    return handle
