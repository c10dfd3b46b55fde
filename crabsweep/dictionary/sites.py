"""Where a dictionary reads and writes in a decoder, and how to get at those tensors.

A *site* is one tensor of the forward pass, named the way dictionary files name it:

  resid_post  output of decoder layer L   blocks.L.hook_resid_post | model.layers.L | layers.L (sparsify)
  resid_pre   input of decoder layer L    blocks.L.hook_resid_pre
  mlp_out     output of layer L's MLP     blocks.L.hook_mlp_out | model.layers.L.mlp | layers.L.mlp
  attn_out    output of layer L's attention  blocks.L.hook_attn_out | model.layers.L.self_attn

(TransformerLens names as SAELens writes them, HF module paths as SAELens writes them for
`AutoModelForCausalLM` models, and sparsify's hookpoint folder names.) `hook(model, arch, site, fn)`
replaces the site's tensor x by fn(x) for the duration of a handle; `Stop` ends a forward pass early
once the last site a caller needs has been seen.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

KINDS = ("resid_pre", "attn_out", "mlp_out", "resid_post")       # in forward order within a layer
_NAME = re.compile(r"^(?:blocks\.(?P<tl>\d+)\.hook_(?P<kind>resid_pre|resid_post|mlp_out|attn_out)"
                   r"|(?:model\.(?:language_model\.)?)?layers\.(?P<hf>\d+)(?:\.(?P<mod>mlp|self_attn))?)$")


@dataclass(frozen=True)
class Site:
    layer: int
    kind: str = "resid_post"

    @property
    def order(self) -> tuple[int, int]:
        return self.layer, KINDS.index(self.kind)

    @property
    def hook_name(self) -> str:
        """The TransformerLens name (what SAELens' `metadata.hook_name` holds)."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    @property
    def hf_name(self) -> str:
        """The HF module path (SAELens' convention for `AutoModelForCausalLM` models)."""
        suffix = {"resid_post": "", "mlp_out": ".mlp", "attn_out": ".self_attn"}.get(self.kind)
        return self.hook_name if suffix is None else f"model.layers.{self.layer}{suffix}"


def parse_site(name: str) -> Site:
    """A dictionary's hook name → Site; ValueError for names crabsweep cannot place."""
    m = _NAME.match(str(name).strip())
    if m is None:
        raise ValueError(f"hook '{name}' is not one crabsweep can place (supported: blocks.L.hook_resid_post|"
                         "resid_pre|mlp_out|attn_out, model.layers.L[.mlp|.self_attn], layers.L[.mlp])")
    if m["tl"] is not None:
        return Site(int(m["tl"]), m["kind"])
    return Site(int(m["hf"]), {"mlp": "mlp_out", "self_attn": "attn_out"}.get(m["mod"], "resid_post"))


def ordered(sites) -> list[Site]:
    return sorted(set(sites), key=lambda s: s.order)


def _module(arch, layers: nn.ModuleList, site: Site) -> tuple[nn.Module, str]:
    layer = layers[site.layer]
    if site.kind == "mlp_out":
        return arch.mlp_of(layer), "post"
    if site.kind == "attn_out":
        return getattr(layer, arch.attn), "post"
    return layer, ("pre" if site.kind == "resid_pre" else "post")


def hook(model: nn.Module, arch, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the site's tensor x by fn(x) in every forward pass until the returned Handle is removed."""
    from ..core.basis import Handle         # late: core/basis.py registers dictionary_feature at its end
    module, kind = _module(arch, arch.decoder_layers(model), site)
    if kind == "pre":
        def pre(m, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return Handle(module.register_forward_pre_hook(pre, with_kwargs=True).remove)

    def post(m, args, out):
        return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
    return Handle(module.register_forward_hook(post).remove)


class Stop(Exception):
    """Raised by a capture hook once the last needed site has been seen (ends the forward pass early)."""


def capture(model: nn.Module, arch, sites: list[Site], stop: bool = True):
    """Hooks recording each site's tensor into the returned dict (raising Stop after the last one if `stop`);
    returns (dict, Handle)."""
    from ..core.basis import Handle
    seen: dict[Site, torch.Tensor] = {}
    last = ordered(sites)[-1]
    handle = Handle()
    for site in ordered(sites):
        def record(x, site=site):
            seen[site] = x
            if stop and site == last:
                raise Stop
            return x
        handle.add(hook(model, arch, site, record).remove)
    return seen, handle


def backbone_of(model: nn.Module, arch) -> nn.Module:
    """The module that runs the decoder layers (e.g. LlamaModel): where a whole pass starts."""
    layers = arch.decoder_layers(model)
    return next(m for m in model.modules() if any(c is layers for c in m.children()))
