"""From dense attribution scores to a circuit: exclusions (skipped layers, universal and massive-activation
units) first, then one of the reference's selection rules over (layer, position, unit) entries.

  topk            the `k` entries of largest |score|
  threshold       the fewest entries whose |score| adds up to `threshold` × the total (the crossing one kept)
  percentage      every entry with |score| ≥ `percentage` × |metric| (the metric backpropagated)
  per_layer_topk  the `per_layer_k` largest of each layer, then at most `k` overall (k: null = no cap)

Unlike the reference, exclusions come before the selection (an excluded unit never takes a slot), the
cumulative share is of every entry (no per-position top-200 cut first), and a rule's missing parameter is an
error rather than a silent fallback. Ties keep (layer, position, unit) order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import torch

from ..core.observers import activations, prompt_examples
from ..errors import UserError
from ..methods.cna import universal_units
from ..config import ROOT

log = logging.getLogger(__name__)
GENERIC = ROOT / "data" / "generic" / "universal_prompts.json"   # the reference's 10 raw prompts


@dataclass
class Attribution:
    """Signed scores per group [rows, units] (float64, CPU); row r is position `rows[r]` (its meaning: `positions`)."""

    scores: list[torch.Tensor]
    rows: list[int]
    positions: str
    metric: float | None = None
    meta: dict = field(default_factory=dict)

    def unit_scores(self) -> list[torch.Tensor]:
        """Per unit, the signed entry of largest magnitude over positions."""
        out = []
        for s in self.scores:
            if s.numel() == 0:
                out.append(torch.zeros(s.shape[1], dtype=s.dtype))
                continue
            idx = s.abs().argmax(0)
            out.append(s.gather(0, idx[None]).squeeze(0))
        return out


def excluded(session, dcfg) -> set[tuple[int, int]]:
    """Units left out of every selection: universal units and massive-activation units, if asked for."""
    out: set[tuple[int, int]] = set()
    if dcfg.exclude_universal:
        texts = json.loads(GENERIC.read_text(encoding="utf-8"))["texts"]
        uni = universal_units(session, dcfg.universal_top, dcfg.universal_fraction, texts)
        log.info("excluding %d universal units (top-%d |activation| on ≥ %.0f%% of %d generic prompts)", len(uni),
                 dcfg.universal_top, 100 * dcfg.universal_fraction, len(texts))
        out |= set(uni)
    if dcfg.exclude_massive is not None:
        massive = massive_units(session, dcfg.exclude_massive)
        log.info("excluding %d massive-activation units (max |activation| ≥ %g × their layer's median): %s",
                 len(massive), dcfg.exclude_massive, ", ".join(f"L{g}:{i}" for g, i in massive[:10]))
        out |= set(massive)
    return out


def massive_units(session, ratio: float, texts: list[str] | None = None) -> list[tuple[int, int]]:
    """Units whose max |activation| over every position of generic texts is ≥ `ratio` × the median of
    their layer's units' maxima (e.g. SmolLM2's L11:1229, ≈ 3,100 against a median ≈ 0.8)."""
    basis = session.basis
    if texts is None:
        texts = json.loads(GENERIC.read_text(encoding="utf-8"))["texts"]
    peak = [torch.zeros(n, dtype=torch.float64) for n in basis.sizes]
    for _ex, acts in activations(session, prompt_examples(session, texts, chat=False), "all", adapter=False):
        for g, a in acts.items():
            mag = a.reshape(a.shape[0], basis.sizes[g], basis.unit_dim).norm(dim=2).max(0).values
            peak[g] = torch.maximum(peak[g], mag)
    out = []
    for g, p in enumerate(peak):
        if len(p):
            med = p.median().clamp_min(1e-12)
            out += [(g, int(i)) for i in (p >= ratio * med).nonzero().flatten()]
    return sorted(out, key=lambda u: -float(peak[u[0]][u[1]]))


def select(attr: Attribution, dcfg, exclude: set | None = None, skip_layers=()) -> list[tuple[tuple[int, int, int], float]]:
    """The selected entries ((layer, position, unit), signed score), by |score| descending."""
    scores = [s.clone() for s in attr.scores]
    for g in skip_layers:
        if 0 <= g < len(scores):
            scores[g].zero_()
    for g, i in exclude or ():
        if g < len(scores) and i < scores[g].shape[1]:
            scores[g][:, i] = 0.0
    flat = torch.cat([s.flatten() for s in scores])
    mag = flat.abs()
    order = torch.sort(mag, descending=True, stable=True).indices
    order = order[mag[order] > 0]
    how = dcfg.select
    if how == "topk":
        picked = order[:dcfg.k]
    elif how == "threshold":
        cum = torch.cumsum(mag[order], 0)
        n = int((cum < dcfg.threshold * float(mag.sum())).sum()) + 1
        picked = order[:min(n, len(order))]
    elif how == "percentage":
        if attr.metric is None:
            raise UserError("discover.select=percentage keeps |score| ≥ percentage × |metric|, and "
                            f"{attr.meta.get('method', 'this method')} has no metric; use topk, threshold or per_layer_topk")
        picked = order[mag[order] >= dcfg.percentage * abs(attr.metric)]
    elif how == "per_layer_topk":
        picked = _per_layer(scores, mag, dcfg.per_layer_k)
        picked = picked[torch.sort(mag[picked], descending=True, stable=True).indices]
        picked = picked[:dcfg.k] if dcfg.k is not None else picked
    else:
        raise UserError(f"discover.select={how} is not one of topk, threshold, percentage, per_layer_topk")
    return [(_key(scores, attr.rows, int(j)), float(flat[j])) for j in picked]


def _per_layer(scores, mag, k: int) -> torch.Tensor:
    out, offset = [], 0
    for s in scores:
        n = s.numel()
        m = mag[offset:offset + n]
        local = torch.sort(m, descending=True, stable=True).indices
        local = local[m[local] > 0][:k]
        out.append(local + offset)
        offset += n
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _key(scores, rows, j: int) -> tuple[int, int, int]:
    for g, s in enumerate(scores):
        if j < s.numel():
            r, i = divmod(j, s.shape[1])
            return g, int(rows[r]), i
        j -= s.numel()
    raise IndexError(j)
