"""Reading a chain: the seed's trajectory table, made explicit, and the idle-unit audit.

Classes (thresholds in `chain.classify`), decided on rounds ≥ 1:
  single_point          the final gap exceeds `gap` in some round, the matched random control does not
                        explain it (specificity > gap/2) and suppression alone does not break unrelated
                        text (collateral ≤ `collateral`): the suppressed circuit was the circuit.
  nonspecific_damage    a large gap, but the random control loses as much: not evidence of a circuit.
  infrastructure_damage a large gap with large collateral: the suppressed units are general machinery.
  exhausting            gaps stay small but the top-1 score falls by ≥ (1 − `halving`) every round.
  multiple_solutions    gaps stay small but mask-on generations diverge from round 0's (mean
                        similarity < `similarity`).
  distributed           gaps stay small and the output stays the same: a deep bench of backups.
"""

from __future__ import annotations

from difflib import SequenceMatcher

from ..core.basis import Unit


def _similarity(rounds: list[dict], r: int) -> float | None:
    base = {g["id"]: g["text"] for g in rounds[0]["generations"] if g["mask"] == "on"}
    pairs = [(base[g["id"]], g["text"]) for g in rounds[r]["generations"] if g["mask"] == "on" and g["id"] in base]
    if not pairs:
        return None
    return sum(SequenceMatcher(None, a, b).ratio() for a, b in pairs) / len(pairs)


def classify(rounds: list[dict], th) -> dict:
    later = rounds[1:]
    if not later:
        return {"class": "undetermined", "reason": "only round 0 ran; a trajectory needs rounds ≥ 1"}
    m = [r["metrics"] for r in rounds]
    gaps = [x["final_gap"] for x in m[1:]]
    spec = [x.get("specificity") for x in m[1:]]
    coll = [x["collateral"] for x in m[1:]]
    top1 = [x["top1_score"] for x in m]
    ratios = [top1[i] / top1[i - 1] if top1[i - 1] else None for i in range(2, len(top1))]
    sims = [_similarity(rounds, r) for r in range(1, len(rounds))]
    evidence = {"final_gap": gaps, "specificity": spec, "collateral": coll, "damage": [x["damage"] for x in m[1:]],
                "top1_score": top1, "top1_ratio": ratios, "generation_similarity": sims,
                "thresholds": {k: float(v) for k, v in th.items()}}
    worst = max(range(len(gaps)), key=lambda i: gaps[i])
    g, s, c = gaps[worst], spec[worst], coll[worst]
    r = worst + 1
    if g > th.gap:
        if s is not None and s <= th.gap / 2:
            cls, why = "nonspecific_damage", (f"round {r}'s final gap {g:.3f} > {th.gap}, but the matched random "
                                               f"control loses nearly as much (specificity {s:.3f})")
        elif c > th.collateral:
            cls, why = "infrastructure_damage", (f"round {r}'s final gap {g:.3f} > {th.gap} comes with collateral "
                                                 f"{c:.3f} > {th.collateral} on unrelated text")
        else:
            spec_txt = f", specificity {s:.3f}" if s is not None else ", no control run"
            cls, why = "single_point", (f"round {r}'s final gap {g:.3f} > {th.gap}{spec_txt}, "
                                        f"collateral {c:.3f}")
    elif len(ratios) >= 1 and all(x is not None and x <= th.halving for x in ratios):
        cls, why = "exhausting", f"top-1 score ratios {[round(x, 3) for x in ratios]} all ≤ {th.halving}"
    elif sims[-1] is not None and sims[-1] < th.similarity:
        cls, why = "multiple_solutions", (f"gaps ≤ {max(gaps):.3f} but the last round's generations are only "
                                          f"{sims[-1]:.2f} similar to round 0's")
    else:
        cls, why = "distributed", (f"final gaps stay ≤ {max(gaps):.3f} (threshold {th.gap}) with "
                                   f"{rounds[-1]['metrics']['n_suppressed']} units suppressed")
    return {"class": cls, "reason": why, "evidence": evidence}


def idle_audit(sizes: list[int], touched: list[Unit]) -> dict:
    """Units never recruited nor suppressed, counted per layer."""
    per_layer = list(sizes)
    for layer, _ in set(touched):
        per_layer[layer] -= 1
    total = sum(per_layer)
    return {"per_layer": per_layer, "total": total, "fraction": total / sum(sizes)}
