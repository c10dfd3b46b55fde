"""K policies: which ranked units become the next round's suppressed additions; the random control.

Registered policies (`k=<name>`), all excluding units already suppressed and all capped by `k.cap`:
  fixed      the global top `k.k`.
  schedule   the global top `k.per_round[r]` (the last entry repeats).
  fraction   the global top ⌈`k.fraction` × all units⌉.
  mass       the smallest top set whose scores cover `k.mass` of the remaining attribution mass.
  per_layer  the top `k.k` of every group.
Scores can be made comparable across groups first (`attribution.normalize=layer_zscore`); the
recorded score is always the raw one. The matched random control draws, per group, as many random
units (not in S) as S holds there.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.basis import Unit
from ..core.device import generator
from ..errors import UserError
from ..registry import Registry
from . import rank

POLICIES = Registry("K policy", key="k")


class _K(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    cap: int | None = Field(None, ge=1)


class FixedK(_K):
    policy: Literal["fixed"]
    k: int = Field(ge=1)


class ScheduleK(_K):
    policy: Literal["schedule"]
    per_round: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)


class FractionK(_K):
    policy: Literal["fraction"]
    fraction: float = Field(gt=0, le=1)


class MassK(_K):
    policy: Literal["mass"]
    mass: float = Field(gt=0, le=1)


class PerLayerK(_K):
    policy: Literal["per_layer"]
    k: int = Field(ge=1)


def _top(k_of):
    """A policy taking the global top k_of(kcfg, round, n_units) (None: every remaining unit)."""
    def select(ranked_on, suppressed, kcfg, r):
        return rank(ranked_on, suppressed, k_of(kcfg, r, sum(map(len, ranked_on))))
    return select


POLICIES.register("fixed", config=FixedK, k_of=lambda c, r, n: int(c.k))(_top(lambda c, r, n: int(c.k)))
POLICIES.register("schedule", config=ScheduleK, k_of=lambda c, r, n: int(list(c.per_round)[min(r, len(c.per_round) - 1)]))(
    _top(lambda c, r, n: int(list(c.per_round)[min(r, len(c.per_round) - 1)])))
POLICIES.register("fraction", config=FractionK, k_of=lambda c, r, n: math.ceil(float(c.fraction) * n))(
    _top(lambda c, r, n: math.ceil(float(c.fraction) * n)))


@POLICIES.register("mass", config=MassK, k_of=lambda c, r, n: None)
def _mass(ranked_on, suppressed, kcfg, r):
    ordered = rank(ranked_on, suppressed)
    total = sum(max(x["score"], 0.0) for x in ordered)
    picked, acc = [], 0.0
    for x in ordered:
        if acc >= float(kcfg.mass) * total:
            break
        picked.append(x)
        acc += max(x["score"], 0.0)
    return picked


@POLICIES.register("per_layer", config=PerLayerK, k_of=lambda c, r, n: None)
def _per_layer(ranked_on, suppressed, kcfg, r):
    picked = []
    for g in range(len(ranked_on)):
        only = [t if i == g else t[:0] for i, t in enumerate(ranked_on)]
        picked += [{"unit": x["unit"], "score": x["score"], "_g": g} for x in rank(only, {u for u in suppressed if u[0] == g}, int(kcfg.k))]
    picked.sort(key=lambda x: -x["score"])
    return [{"unit": x["unit"], "score": x["score"]} for x in picked]


def normalize(scores: list[torch.Tensor], how: str) -> list[torch.Tensor]:
    if how in (None, "none"):
        return scores
    out = []
    for s in scores:
        std = s.std() if len(s) > 1 else torch.tensor(0.0)
        out.append((s - s.mean()) / std if std > 0 else torch.zeros_like(s))
    return out


def check_k(kcfg, sizes: list[int], n_start: int, rounds: int) -> None:
    """Refuse impossible K before any training: more units than the model has."""
    n_units = sum(sizes)
    k_of = POLICIES.get(kcfg.policy).k_of
    ks = [k_of(kcfg, r, n_units) for r in range(rounds)]
    if kcfg.policy == "per_layer":
        live = [s for s in sizes if s]
        ks = [min(int(kcfg.k), *live) * len(live)] * rounds
    cap = kcfg.get("cap")
    if cap is not None:
        ks = [min(k, int(cap)) if k is not None else int(cap) for k in ks]
    need = n_start + sum(k for k in ks if k is not None)
    if need > n_units:
        raise UserError(f"k={kcfg.policy} (k.k={kcfg.get('k')}) × chain.rounds={rounds} + {n_start} inventory "
                        f"units = {need} exceeds the {n_units} units available; lower K or chain.rounds")


def select(scores: list[torch.Tensor], suppressed: set, kcfg, round_index: int, how: str = "none",
           basis_json=None) -> list[dict]:
    """The ranked `{unit, score}` list of units to add to S after this round (score: the raw score; unit:
    written by `basis_json`, default {"layer", "index"})."""
    picked = POLICIES.get(kcfg.policy).obj(normalize(scores, how), suppressed, kcfg, round_index)
    cap = kcfg.get("cap")
    picked = picked[:int(cap)] if cap is not None else picked
    as_json = basis_json or (lambda u: {"layer": int(u[0]), "index": int(u[1])})
    return [{"unit": as_json(Unit(x["unit"]["layer"], x["unit"]["index"])),
             "score": x["score"] if how in (None, "none") else float(scores[x["unit"]["layer"]][x["unit"]["index"]])}
            for x in picked]


def matched_random(suppressed: list, sizes: list[int], seed: int, avoid=()) -> list[Unit]:
    """Per group, as many uniformly random units outside `suppressed` (and `avoid`) as `suppressed` has there."""
    g = generator(seed)
    by_group: dict[int, set[int]] = {}
    for group, index in suppressed:
        by_group.setdefault(group, set()).add(index)
    avoided = {(int(a), int(b)) for a, b in avoid}
    out: list[Unit] = []
    for group in sorted(by_group):
        taken = by_group[group]
        pool = torch.tensor([i for i in range(sizes[group]) if i not in taken and (group, i) not in avoided])
        if len(pool) < len(taken):
            raise UserError(f"layer {group} has too few free units for a matched random control; lower K "
                            "or set chain.control=none")
        pick = pool[torch.randperm(len(pool), generator=g)[:len(taken)]]
        out += [Unit(group, int(i)) for i in sorted(pick.tolist())]
    return out
