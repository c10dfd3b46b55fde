"""Attribution methods: how much each unit contributed to learning (or producing) the behaviour.

Every method is a registry entry declaring its kind, the granularities and adapters it is defined for,
and its config model; a combination it does not declare is refused when the config is composed.

  streamed  (methods/streamed.py) captured in the training pass itself, all at once:
            lora_a_grad, grad_norm, grad_x_act, max_grad
  post-hoc  a pass of its own after training, weights frozen, mask on:
            integrated_gradients (methods/ig.py), cna (methods/cna.py), relp (methods/relp.py)

A post-hoc entry's `run(session, acfg)` returns `(scores per group, extra metrics)`. Scores are one
float tensor per group; suppressed units score 0 and are never ranked (`exclude`, `rank`).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..registry import Registry

METHODS = Registry("attribution method", key="attribution")
ALL = None   # granularities / adapters: None means every one


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    normalize: Literal["none", "layer_zscore"] = "none"
    exclude_massive: float | None = Field(None, gt=1)   # never recruit units whose peak |activation| ≥ this × median


def streamed_names() -> list[str]:
    return [e.name for e in METHODS if e.kind == "streamed"]


def exclude(scores: dict[str, list[torch.Tensor]], suppressed) -> dict[str, list[torch.Tensor]]:
    """Set the suppressed units' scores to 0 in place (they are never ranked); returns `scores`."""
    for group, index in suppressed:
        for per_group in scores.values():
            per_group[group][index] = 0.0
    return scores


def rank(scores: list[torch.Tensor], exclude: set = frozenset(), top: int | None = None, basis_json=None) -> list[dict]:
    """Units ordered by score, highest first (ties: lower group, then lower index), excluded dropped."""
    sizes = [len(s) for s in scores]
    flat = torch.cat([s.float() for s in scores])
    group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index_of = torch.cat([torch.arange(n) for n in sizes])
    offsets = [0, *accumulate(sizes)]
    keep = torch.ones(len(flat), dtype=torch.bool)
    for group, index in exclude:
        keep[offsets[group] + index] = False
    if torch.isnan(flat[keep]).any():
        from ..errors import UserError
        raise UserError("attribution scores contain NaN (the training diverged); lower train.lr")
    candidates = keep.nonzero().squeeze(1)
    order = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]
    if top is not None:
        order = order[:top]
    as_json = basis_json or (lambda u: {"layer": int(u[0]), "index": int(u[1])})
    return [{"unit": as_json((int(group_of[i]), int(index_of[i]))), "score": float(flat[i])} for i in order.tolist()]


from . import cna, ig, relp, streamed as _streamed  # noqa: E402,F401  (register the methods)
