"""K policies: which ranked units become the next round's suppressed additions; the random control.

`fixed` takes the global top-K by the ranking method's score, excluding units already suppressed.
The matched random control draws, per layer, as many random units (not in S) as S holds there.
"""

from __future__ import annotations

import torch

from .attribution import rank
from .device import generator
from .errors import UserError
from .units import Unit

POLICIES = ("fixed",)


def check_k(kcfg, n_units: int, n_start: int, rounds: int) -> None:
    """Refuse impossible K before any training: K ≤ 0, or more units than the model has."""
    if kcfg.policy not in POLICIES:
        raise UserError(f"unknown k policy '{kcfg.policy}'; choose from {', '.join(POLICIES)}")
    k = int(kcfg.k)
    if k <= 0:
        raise UserError(f"k.k={k} must be ≥ 1")
    need = n_start + k * rounds
    if need > n_units:
        raise UserError(f"k.k={k} × chain.rounds={rounds} + {n_start} inventory units = {need} exceeds the "
                        f"{n_units} units available; lower k.k or chain.rounds")


def select(scores: list[torch.Tensor], suppressed: set[Unit], kcfg, round_index: int) -> list[dict]:
    """The ranked `{unit, score}` list of units to add to S after this round."""
    return rank(scores, exclude=suppressed, top=int(kcfg.k))


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
            raise UserError(f"layer {layer} has too few free units for a matched random control")
        pick = pool[torch.randperm(len(pool), generator=g)[:len(taken)]]
        out += [(layer, int(i)) for i in sorted(pick.tolist())]
    return out
