"""Contrastive neuron attribution (post-hoc): how differently units are activated, per unit.

Two modes:
  task        mean activation with the adapter − without it, over the task's examples at the `positions`
              (`target` tokens or the `last` prompt position): what training changed.
  contrastive mean(positive) − mean(negative) at the last position of two prompt lists, chat-formatted
              (the NousResearch reference), base model.
Signed deltas are kept in the records (`cna_signed`); ranking is by |delta| (for multi-feature units, the
L2 norm of the unit's features). Groups in `skip_layers` score 0 (the reference skips layers 0–1).
`filter_universal` zeroes "universal" units: in their layer's top-`universal_top` by |activation| at the
last position of raw (not chat-formatted) generic texts, on ≥ `universal_fraction` of them.
"""

from __future__ import annotations

import json
from typing import Literal

import torch
from pydantic import Field

from ..core.observers import activations, mean_activations, prompt_examples
from . import METHODS, MethodConfig


class CNAConfig(MethodConfig):
    positions: Literal["target", "last"] = "target"
    positive: list[str] | None = None
    negative: list[str] | None = None
    skip_layers: list[int] = []
    filter_universal: bool = False
    universal_top: int = Field(20, ge=1)
    universal_fraction: float = Field(0.8, gt=0, le=1)


def signed_delta(session, acfg) -> list[torch.Tensor]:
    """Per-feature signed mean difference (positive − negative, or adapted − base); the prompt lists are
    chat-formatted unless `acfg["chat"]` is false."""
    if acfg.get("positive") and acfg.get("negative"):
        chat = bool(acfg.get("chat", True))
        pos = mean_activations(session, prompt_examples(session, list(acfg["positive"]), chat), "last", adapter=False)
        neg = mean_activations(session, prompt_examples(session, list(acfg["negative"]), chat), "last", adapter=False)
    else:
        which = acfg.get("positions", "target")
        pos = mean_activations(session, session.task.train, which, adapter=True)
        neg = mean_activations(session, session.task.train, which, adapter=False)
    return [(p - n).float() for p, n in zip(pos, neg)]


def per_unit(basis, features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Feature-level values → one value per unit (itself for unit_dim 1, else the L2 norm)."""
    out = []
    for g, f in enumerate(features):
        v = f.reshape(basis.sizes[g], basis.unit_dim)
        out.append(v[:, 0].clone() if basis.unit_dim == 1 else v.norm(dim=1))
    return out


def universal_units(session, top: int, fraction: float, texts: list[str] | None = None) -> list[tuple[int, int]]:
    """Units in their group's top-`top` by |activation| at the last position on ≥ `fraction` of generic texts."""
    basis = session.basis
    if texts is None:
        texts = json.loads(open(session.cfg.eval.collateral_path, encoding="utf-8").read())["texts"]
    counts = [torch.zeros(n) for n in basis.sizes]
    for _ex, acts in activations(session, prompt_examples(session, texts, chat=False), "last", adapter=False):
        for g, a in acts.items():
            mag = a[-1].reshape(basis.sizes[g], basis.unit_dim).norm(dim=1)
            counts[g][mag.topk(min(top, len(mag))).indices] += 1
    return [(g, int(i)) for g, c in enumerate(counts) for i in (c >= fraction * len(texts)).nonzero().flatten()]


@METHODS.register("cna", config=CNAConfig, kind="posthoc",
                  granularities=("mlp_neuron", "attention_head", "residual_dim", "dictionary_feature"),
                  adapters=None)
def run(session, acfg, mask):
    signed = per_unit(session.basis, signed_delta(session, acfg))
    for g in acfg.get("skip_layers") or []:
        if 0 <= g < len(signed):
            signed[g].zero_()
    scores = [s.abs() for s in signed]
    if acfg.get("filter_universal"):
        for g, i in universal_units(session, int(acfg.universal_top), float(acfg.universal_fraction)):
            scores[g][i] = 0.0
    return {"cna": scores, "cna_signed": signed}, {}
