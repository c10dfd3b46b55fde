"""K policies: which ranked units become the next round's suppressed additions; the random control.

Policies (`k=<name>`), all excluding units already suppressed and all capped by `k.cap` (if set):
  fixed      the global top `k.k`.
  schedule   the global top `k.per_round[r]` (the last entry repeats).
  fraction   the global top ⌈`k.fraction` × all units⌉.
  mass       the smallest top set whose scores cover `k.mass` of the remaining attribution mass.
  per_layer  the top `k.k` of every layer.
Scores can be made comparable across layers first (`attribution.normalize=layer_zscore`).
The matched random control draws, per layer, as many random units (not in S) as S holds there.
"""

from __future__ import annotations

import math

import torch

from .attribution import rank
from ..core.device import generator
from ..errors import UserError
from ..core.basis import Unit, unit_json

POLICIES = ("fixed", "schedule", "fraction", "mass", "per_layer")


def normalize(scores: list[torch.Tensor], how: str) -> list[torch.Tensor]:
    if how in (None, "none"):
        return scores
    if how == "layer_zscore":
        out = []
        for s in scores:
            std = s.std() if len(s) > 1 else torch.tensor(0.0)
            out.append((s - s.mean()) / std if std > 0 else torch.zeros_like(s))
        return out
    raise UserError(f"attribution.normalize={how} must be none or layer_zscore")


def _k_for_round(kcfg, r: int, n_units: int) -> int | None:
    if kcfg.policy in ("fixed", "per_layer"):
        return int(kcfg.k)
    if kcfg.policy == "schedule":
        per = list(kcfg.per_round)
        return int(per[min(r, len(per) - 1)])
    if kcfg.policy == "fraction":
        return math.ceil(float(kcfg.fraction) * n_units)
    return None   # mass: data-dependent


def check_k(kcfg, sizes: list[int], n_start: int, rounds: int) -> None:
    """Refuse impossible K before any training: K ≤ 0, or more units than the model has."""
    if kcfg.policy not in POLICIES:
        raise UserError(f"unknown k policy '{kcfg.policy}'; choose from {', '.join(POLICIES)}")
    n_units = sum(sizes)
    cap = kcfg.get("cap")
    if cap is not None and int(cap) <= 0:
        raise UserError(f"k.cap={cap} must be ≥ 1 (or null)")
    if kcfg.policy == "schedule" and not kcfg.get("per_round"):
        raise UserError("k=schedule needs k.per_round=[k0,k1,...]")
    if kcfg.policy == "fraction" and not 0 < float(kcfg.fraction) <= 1:
        raise UserError(f"k.fraction={kcfg.fraction} must be in (0, 1]")
    if kcfg.policy == "mass" and not 0 < float(kcfg.mass) <= 1:
        raise UserError(f"k.mass={kcfg.mass} must be in (0, 1]")
    ks = [_k_for_round(kcfg, r, n_units) for r in range(rounds)]
    if any(k is not None and k <= 0 for k in ks):
        raise UserError(f"k.k={min(k for k in ks if k is not None)} must be ≥ 1")
    if kcfg.policy == "per_layer":
        ks = [min(int(kcfg.k), *(s for s in sizes if s)) * sum(1 for s in sizes if s)] * rounds
    if cap is not None:
        ks = [min(k, int(cap)) if k is not None else int(cap) for k in ks]
    need = n_start + sum(k for k in ks if k is not None)
    if need > n_units:
        raise UserError(f"k={kcfg.policy} (k.k={kcfg.get('k')}) × chain.rounds={rounds} + {n_start} inventory "
                        f"units = {need} exceeds the {n_units} units available; lower K or chain.rounds")


def select(scores: list[torch.Tensor], suppressed: set[Unit], kcfg, round_index: int,
           how: str = "none") -> list[dict]:
    """The ranked `{unit, score}` list of units to add to S after this round (score: the raw score)."""
    ranked_on = normalize(scores, how)
    cap = int(kcfg.cap) if kcfg.get("cap") is not None else None
    if kcfg.policy == "per_layer":
        picked = []
        for layer in range(len(ranked_on)):
            only = [t if i == layer else t[:0] for i, t in enumerate(ranked_on)]
            picked += rank(only, {u for u in suppressed if u[0] == layer}, int(kcfg.k))
        picked.sort(key=lambda x: -x["score"])
    elif kcfg.policy == "mass":
        ordered = rank(ranked_on, suppressed)
        total = sum(max(x["score"], 0.0) for x in ordered)
        picked, acc = [], 0.0
        for x in ordered:
            if acc >= float(kcfg.mass) * total:
                break
            picked.append(x)
            acc += max(x["score"], 0.0)
    else:
        picked = rank(ranked_on, suppressed, _k_for_round(kcfg, round_index, sum(map(len, scores))))
    picked = picked[:cap] if cap is not None else picked
    raw = {(x["unit"]["layer"], x["unit"]["index"]): x for x in rank(scores, suppressed)} if how != "none" else None
    if raw is None:
        return picked
    return [{"unit": unit_json(u), "score": raw[u]["score"]}
            for u in ((x["unit"]["layer"], x["unit"]["index"]) for x in picked)]


def matched_random(suppressed: list[Unit], sizes: list[int], seed: int) -> list[Unit]:
    """Per layer, as many uniformly random units outside `suppressed` as `suppressed` has there."""
    g = generator(seed)
    by_layer: dict[int, set[int]] = {}
    for layer, index in suppressed:
        by_layer.setdefault(layer, set()).add(index)
    out: list[Unit] = []
    for layer in sorted(by_layer):
        taken = by_layer[layer]
        pool = torch.tensor([i for i in range(sizes[layer]) if i not in taken])
        if len(pool) < len(taken):
            raise UserError(f"layer {layer} has too few free units for a matched random control; lower K "
                            "or set chain.control=none")
        pick = pool[torch.randperm(len(pool), generator=g)[:len(taken)]]
        out += [(layer, int(i)) for i in sorted(pick.tolist())]
    return out
