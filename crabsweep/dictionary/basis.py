"""`suppression=dictionary_feature`: units are the features of one or more sparse dictionaries.

    crabsweep chain suppression=dictionary_feature suppression.path=<folder or name> attribution=grad_x_act

Each dictionary (a folder: SAELens, sparsify or crosscoder; a bare name is looked up in
$CRABSWEEP_CACHE/dictionaries/) is one group; a unit is Unit(group, feature), written
{"dictionary": <name>, "feature": i}, and spans the dictionary's layers. Suppression applies the
configured ablation (`method`, `scale`, `layer`, `lr`, `steps`, `propagate`; dictionary/ablate.py).
Attribution reads features through `observe`: the tap gets the feature activations f (the encoding of
the sites' activations, after any active edit) and a tensor carrying ∂L/∂f — gathered by an identity
whose backward adds ∂L/∂x_l·W_dec[:, l]ᵀ at the layers the method writes to, so the forward values are
bitwise those of the unobserved model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..core.basis import GRANULARITIES, Basis, Handle, Unit
from ..core.interventions import Add, Mask, Scale
from ..core.models import LoadedModel, cache_dir, text_config
from ..errors import UserError
from . import ablate, formats, sites    # modules, not names: core/basis.py imports this module at its end


class FeatureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    granularity: Literal["dictionary_feature"]
    path: str | list[str]
    mode: Literal["zero"] = "zero"
    method: Literal["single_layer", "many_layer", "perturbation"] = "single_layer"
    layer: int | None = None
    scale: float | Literal["auto"] = 1.0
    lr: float = Field(1.0, gt=0, allow_inf_nan=False)
    steps: int = Field(15, ge=0)
    propagate: bool = True

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, v):
        ok = isinstance(v, str) and v or isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)
        if not ok:
            raise ValueError("needs a dictionary: a folder, a name under $CRABSWEEP_CACHE/dictionaries, or a list "
                             "of them (suppression.path=...)")
        return v


def resolve(path: str) -> Path:
    """A dictionary folder, or a name under $CRABSWEEP_CACHE/dictionaries/."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    cached = cache_dir() / "dictionaries" / str(path)
    if "/" not in str(path) and cached.is_dir():
        return cached
    raise UserError(f"dictionary '{path}' is neither a folder nor a name under {cache_dir() / 'dictionaries'}; "
                    "train one with `crabsweep dictionary train` or pass suppression.path=<folder>")


def _fingerprint(folder: str) -> dict:
    """sha256 of a dictionary folder's cfg.json and weight files (what a cached round depends on)."""
    from ..core.models import sha256_file
    p = Path(folder)
    return {f.name: sha256_file(f) for f in sorted(p.glob("*")) if f.suffix in (".json", ".safetensors")
            and f.name not in ("training.json", "sparsity.safetensors")} if p.is_dir() else {}


@GRANULARITIES.register("dictionary_feature", config=FeatureConfig)
class DictionaryFeatures(Basis):
    """Features of sparse dictionaries (SAEs, crosscoders); one group per dictionary."""

    name = "dictionary_feature"
    modes = ("zero",)

    def __init__(self, loaded: LoadedModel, cfg=None, dictionaries: list[formats.Dictionary] | None = None):
        cfg = dict(cfg or {})
        if dictionaries is None:
            paths = cfg.get("path")
            paths = [paths] if isinstance(paths, str) else list(paths or [])
            dictionaries = [formats.load_dictionary(resolve(p)) for p in paths]
        self.dictionaries = [d.to(loaded.device) for d in dictionaries]
        self.method, self.layer = cfg.get("method", "single_layer"), cfg.get("layer")
        self.knobs = {k: cfg.get(k, v) for k, v in (("lr", 1.0), ("steps", 15), ("propagate", True))}
        self.inner = None                                    # the Runner whose first pass is running
        self.fingerprint = {d.name: _fingerprint(d.source) for d in self.dictionaries}
        self._check(loaded)
        super().__init__(loaded, [d.n_features for d in self.dictionaries], unit_dim=1)

    def _check(self, loaded: LoadedModel) -> None:
        names = [d.name for d in self.dictionaries]
        if not names or len(set(names)) != len(names):
            raise UserError(f"suppression.path needs one or more dictionaries with distinct folder names, got {names}")
        n_layers = len(loaded.arch.decoder_layers(loaded.model))
        hidden = text_config(loaded.model.config).hidden_size
        for d in self.dictionaries:
            if d.d != hidden or max(d.layers) >= n_layers:
                raise UserError(f"dictionary {d.name} reads width {d.d} at layers {list(d.layers)}, but the model has "
                                f"width {hidden} and {n_layers} layers; it was made for another model")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dictionaries]

    # -- units --------------------------------------------------------------------------------------
    def layers_of(self, unit) -> tuple[int, ...]:
        return self.dictionaries[int(unit[0])].layers

    def check(self, units, what: str = "unit") -> list[Unit]:
        out = []
        for u in units:
            g, i = u
            if not (isinstance(g, int) and isinstance(i, int) and 0 <= g < len(self.sizes) and 0 <= i < self.sizes[g]):
                known = ", ".join(f"{d.name} ({d.n_features} features)" for d in self.dictionaries)
                raise UserError(f"{what} (dictionary {g}, feature {i}) is out of range; the dictionaries are {known}")
            out.append(Unit(g, i))
        return out

    def unit_json(self, u) -> dict:
        return {"dictionary": self.dictionaries[int(u[0])].name, "feature": int(u[1])}

    def unit_from_json(self, d) -> Unit:
        if isinstance(d, dict) and "dictionary" in d:
            name, i = d["dictionary"], d.get("feature")
            if name not in self.names:
                raise UserError(f"unit {d!r} names dictionary '{name}', but the loaded ones are {self.names}")
            if not isinstance(i, int) or isinstance(i, bool):
                raise UserError(f"unit {d!r}: feature must be an integer")
            return Unit(self.names.index(name), i)
        if isinstance(d, (list, tuple)) and len(d) == 2 and all(isinstance(v, int) for v in d):
            return Unit(int(d[0]), int(d[1]))
        raise UserError(f"unit {d!r} is not a dictionary feature; write {{\"dictionary\": name, \"feature\": i}}")

    def slots_for(self, group: int, layer: int | None) -> tuple[int, ...]:
        """The slots of one model layer (`layer`), or every slot (`layer` None)."""
        d = self.dictionaries[group]
        if layer is None:
            return tuple(range(d.n_layers))
        slots = tuple(i for i, s in enumerate(d.sites) if s.layer == int(layer))
        if not slots:
            raise UserError(f"dictionary {d.name} does not decode to layer {layer}; choose one of {list(d.layers)}")
        return slots

    def written_slots(self, group: int, method: str | None = None, layer: int | None = None) -> tuple[int, ...]:
        """Where an ablation by `method` writes: one layer for single_layer, every layer otherwise."""
        method = method or self.method
        d = self.dictionaries[group]
        if method != "single_layer":
            return tuple(range(d.n_layers))
        layer = self.layer if layer is None else layer
        if layer is None and len(d.layers) > 1:
            raise UserError(f"single_layer ablation of {d.name} (layers {list(d.layers)}) needs a layer; set "
                            "suppression.layer (or use method=many_layer / perturbation)")
        return self.slots_for(group, layer)

    # -- values → edits -----------------------------------------------------------------------------
    def _by_group(self, units) -> dict[int, torch.Tensor]:
        out: dict[int, list[int]] = {}
        for g, i in self.check(units):
            out.setdefault(g, []).append(i)
        return {g: torch.tensor(sorted(set(v)), device=self.device) for g, v in out.items()}

    def _auto(self, group: int, idx: torch.Tensor, slots) -> torch.Tensor:
        """Per-feature s = 1/(w_i·d_i) over the written slots: what the encoder reads of the removed term."""
        d = self.dictionaries[group]
        s = list(slots)
        overlap = torch.einsum("ldf,fld->f", d.W_enc[s][:, :, idx], d.W_dec[idx][:, s])
        if (overlap.abs() < 1e-6).any():
            raise UserError(f"scale=auto: feature(s) {idx[overlap.abs() < 1e-6].tolist()} of {d.name} have w·d ≈ 0 at "
                            "the written layers; give a numeric scale")
        return 1.0 / overlap

    def edits(self, value) -> list[ablate.Edit]:
        if isinstance(value, Mask):
            if value.mode != "zero":
                raise UserError(f"dictionary features take mode zero (an ablation), not {value.mode}")
            if self.method != "perturbation":         # the configured layer must exist, even while S is empty
                for g in self.groups:
                    self.written_slots(g)
            value = ablate.Ablate(value.units, self.method, value.scale, self.layer, float(self.knobs["lr"]),
                           int(self.knobs["steps"]), bool(self.knobs["propagate"]), positions=value.positions)
        if isinstance(value, ablate.Ablate):
            out = []
            for g, idx in self._by_group(value.units).items():
                if value.method == "perturbation":
                    solve = {"target": None, "lr": value.lr, "steps": value.steps, "propagate": value.propagate}
                    out.append(ablate.Edit(g, idx, tuple(range(self.dictionaries[g].n_layers)), solve=solve))
                    continue
                slots = self.written_slots(g, value.method, value.layer)
                s = self._auto(g, idx, slots) if value.scale == "auto" else torch.full(
                    (len(idx),), float(value.scale), device=self.device)
                out.append(ablate.Edit(g, idx, slots, factor=-s))
            return out
        if isinstance(value, ablate.Clamp):
            solve = {"target": float(value.target), "lr": value.lr, "steps": value.steps, "propagate": value.propagate}
            return [ablate.Edit(g, idx, tuple(range(self.dictionaries[g].n_layers)), solve=solve)
                    for g, idx in self._by_group(value.units).items()]
        if isinstance(value, Scale):
            return [ablate.Edit(g, idx, self.written_slots(g), factor=torch.full((len(idx),), float(value.multiplier) - 1.0,
                                                                        device=self.device))
                    for g, idx in self._by_group(value.units).items()]
        if isinstance(value, ablate.Steer):
            return [ablate.Edit(g, idx, self.slots_for(g, value.layer),
                         const=torch.full((len(idx),), float(value.alpha), device=self.device))
                    for g, idx in self._by_group(value.units).items()]
        if isinstance(value, Add):
            v = value.vector.float().to(self.device).flatten()
            if v.numel() != self.sizes[value.group]:
                raise UserError(f"Add on dictionary {self.names[value.group]} needs a vector of its "
                                f"{self.sizes[value.group]} features, got {v.numel()}")
            idx = torch.arange(len(v), device=self.device)
            return [ablate.Edit(value.group, idx, self.written_slots(value.group), const=float(value.alpha) * v)]
        raise UserError(f"{type(value).__name__} is not defined for dictionary features (Mask, Scale, Add, Ablate, "
                        "Steer, Clamp are)")

    def apply(self, model, intervention, positions=None) -> Handle:
        return ablate.install(self, model, self.edits(intervention), positions, intervention.positions)

    # -- observing ----------------------------------------------------------------------------------
    def observe(self, model, tap) -> Handle:
        handle = Handle()
        for g, d in enumerate(self.dictionaries):
            handle.add(_Observer(self, model, g, tap).install().remove)
        return handle

    def inject_slots(self, group: int) -> tuple[int, ...]:
        """Where ∂L/∂f is gathered: the layers the configured method writes to (all, for perturbation)."""
        if self.method == "single_layer" and (self.layer is not None or self.dictionaries[group].n_layers == 1):
            return self.slots_for(group, self.layer)
        return tuple(range(self.dictionaries[group].n_layers))


class _Observer:
    """Per forward pass: collect the dictionary's sites, gather ∂L/∂f, call the tap at the last site."""

    def __init__(self, basis: DictionaryFeatures, model, group: int, tap):
        self.basis, self.model, self.group, self.tap = basis, model, group, tap
        self.dic = basis.dictionaries[group]
        order = sorted(range(self.dic.n_layers), key=lambda i: self.dic.sites[i].order)
        self.first, self.last = order[0], order[-1]
        self.inject = set(basis.inject_slots(group))
        self.xs: dict[int, torch.Tensor] = {}
        self.f = None

    def install(self) -> Handle:
        handle = Handle()
        for slot, site in enumerate(self.dic.sites):
            def at(x, slot=slot):
                return self._at(slot, x)
            handle.add(sites.hook(self.model, self.basis.loaded.arch, site, at).remove)
        return handle

    def _at(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        if self.basis.inner is not None:
            return x
        if slot == self.first:
            self.xs, self.f = {}, None
        self.xs[slot] = x.detach()
        if torch.is_grad_enabled() and slot in self.inject:
            if self.f is None:
                self.f = torch.zeros((*x.shape[:-1], self.dic.n_features), device=x.device, requires_grad=True)
            x = ablate.feature_grad(x, self.f, self.dic.W_dec[:, slot])
        if slot == self.last:
            a = self.dic.encode(torch.stack([self.xs[i] for i in range(self.dic.n_layers)], dim=-2)).detach()
            self.tap(self.group, self.f if self.f is not None else a, a)
            self.xs, self.f = {}, None
        return x
