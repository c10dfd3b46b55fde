"""Reading a chain: the seed's trajectory table, made explicit and measured against controls.

Every threshold is relative — to the round's matched random control and, with replicates, to the
spread across seeds — above an absolute noise `floor` (nats). Per round r ≥ 1 that has a control:

  effect e(X)   = max(final gap, behaviour-token CE gap) of the round trained under X (S, or random R)
  lost(X)       = the held-out task score fell below the round-0 gate (`chain.gate.min_task_score`)
  noise n       = floor + seed_k × (seed spread of the effect, when `chain.seeds` has ≥ 2 seeds)
  moved(X)      = e(X) > n or lost(X)
  specific      = moved(S) and e(S) − e(R) > n and e(R) ≤ specific_fraction × e(S)  (or lost(S), not lost(R))
  infrastructure = collateral(S) − collateral(R) > max(n, collateral_fraction × [e(S) − e(R)]₊)
  mattered      = the mask alone (no adapter) cost the task more than R's did: damage(S) − damage(R) > n

Classes, first match wins:
  undetermined          only round 0 ran; round 0 did not learn the behaviour; or a round without a
                        control moved (rerun with chain.control=every)
  infrastructure_damage suppression breaks unrelated text beyond the control: general machinery
  single_point          a round's S loses the behaviour, specifically (the control does not)
  nonspecific_damage    S loses it, but a matched random set loses about as much
  inconclusive          neither S nor R moved anything measurable, and the mask alone mattered no more than
                        R's: the suppressed units were not shown to matter
  exhausting            ≥ `min_ratios` consecutive top-1 score ratios ≤ `halving` (the pool runs out)
  multiple_solutions    the behaviour is kept, but the last round's generations are less similar to round
                        0's than the control's by more than `similarity_margin`
  distributed           S mattered, yet the retrained model recovers the behaviour: a bench of backups
"""

from __future__ import annotations

from difflib import SequenceMatcher


def similarity(base_gens: list[dict], gens: list[dict]) -> float | None:
    """Mean string similarity of mask-on generations to round 0's, matched by sample id."""
    base = {g["id"]: g["text"] for g in base_gens if g["mask"] == "on"}
    pairs = [(base[g["id"]], g["text"]) for g in gens if g["mask"] == "on" and g["id"] in base]
    if not pairs:
        return None
    return sum(SequenceMatcher(None, a, b).ratio() for a, b in pairs) / len(pairs)


def _pos(x) -> float:
    return max(x, 0.0) if x is not None else 0.0


def _effect(m: dict, suffix: str = "") -> float:
    return max(_pos(m.get("final_gap" + suffix)), _pos(m.get("behaviour_gap" + suffix)))


def _lost(score, bar) -> bool:
    return score is not None and bar is not None and score < float(bar)


def round_evidence(m: dict, th, bar, spread: float = 0.0) -> dict:
    """The per-round facts the classes are decided on."""
    n = float(th.floor) + float(th.seed_k) * spread
    e_s, e_r = _effect(m), _effect(m, "_random")
    lost_s, lost_r = _lost(m.get("task_score"), bar), _lost(m.get("task_score_random"), bar)
    moved_s, moved_r = e_s > n or lost_s, e_r > n or lost_r
    excess = e_s - e_r
    specific = moved_s and ((excess > n and e_r <= float(th.specific_fraction) * e_s) or (lost_s and not lost_r))
    coll = _pos(m.get("collateral")) - _pos(m.get("collateral_random"))
    infra = coll > max(n, float(th.collateral_fraction) * max(excess, 0.0))
    mattered = moved_s or (m.get("damage", 0.0) or 0.0) - (m.get("damage_random") or 0.0) > n
    return {"noise": n, "effect": e_s, "effect_random": e_r, "lost": lost_s, "lost_random": lost_r, "moved": moved_s,
            "moved_random": moved_r, "specific": specific, "collateral_excess": coll, "infrastructure": infra,
            "mattered": mattered}


def classify(rounds: list[dict], th, gate: tuple[bool, str] = (True, ""), bar=None,
             spreads: list[float] | None = None) -> dict:
    """The trajectory class of a chain from its round records (metrics already joined with the control's)."""
    if not gate[0]:
        return {"class": "undetermined", "reason": gate[1]}
    if len(rounds) < 2:
        return {"class": "undetermined", "reason": "only round 0 ran; a trajectory needs rounds ≥ 1"}
    later = rounds[1:]
    top1 = [r["metrics"].get("top1_score") for r in rounds]
    ratios = [top1[i] / top1[i - 1] if top1[i] is not None and top1[i - 1] else None for i in range(1, len(top1))]
    ev = {}
    for i, rec in enumerate(later, start=1):
        m = rec["metrics"]
        spread = spreads[i] if spreads else 0.0
        if m.get("final_gap_random") is None:
            ev[i] = {"controlled": False, "effect": _effect(m), "noise": float(th.floor) + float(th.seed_k) * spread}
        else:
            ev[i] = {"controlled": True, **round_evidence(m, th, bar, spread)}
    evidence = {"rounds": ev, "top1_ratio": ratios, "thresholds": {k: float(v) for k, v in th.items()}}
    out = lambda cls, why: {"class": cls, "reason": why, "evidence": evidence}  # noqa: E731
    blind = [r for r, e in ev.items() if not e["controlled"] and e["effect"] > e["noise"]]
    if blind:
        return out("undetermined", f"round {blind[0]} moved (effect {ev[blind[0]]['effect']:.3f} nats) but ran no "
                                   "matched random control; rerun with chain.control=every")
    seen = {r: e for r, e in ev.items() if e["controlled"]}
    if not seen:
        return out("undetermined", "no round ran a matched random control; rerun with chain.control=every")
    infra = [r for r, e in seen.items() if e["infrastructure"]]
    if infra:
        r = max(infra, key=lambda k: seen[k]["collateral_excess"])
        return out("infrastructure_damage", f"round {r}: suppression costs {seen[r]['collateral_excess']:.3f} nats more on "
                                            f"unrelated text than its matched random control (behaviour effect "
                                            f"{seen[r]['effect']:.3f} vs {seen[r]['effect_random']:.3f})")
    specific = [r for r, e in seen.items() if e["specific"]]
    if specific:
        r = max(specific, key=lambda k: seen[k]["effect"] - seen[k]["effect_random"])
        e = seen[r]
        return out("single_point", f"round {r}: the suppressed set costs {e['effect']:.3f} nats"
                                   f"{' and the behaviour (task score)' if e['lost'] else ''}, its matched random "
                                   f"control {e['effect_random']:.3f} (noise {e['noise']:.3f})")
    moved = [r for r, e in seen.items() if e["moved"]]
    if moved:
        r = max(moved, key=lambda k: seen[k]["effect"])
        return out("nonspecific_damage", f"round {r}: the suppressed set costs {seen[r]['effect']:.3f} nats, but its "
                                         f"matched random control costs {seen[r]['effect_random']:.3f} as well")
    if not any(e["mattered"] for e in seen.values()):
        n = rounds[-1]["metrics"].get("n_suppressed")
        return out("inconclusive", f"neither the {n} suppressed units nor matched random ones moved anything measurable "
                                   f"(noise floor {max(e['noise'] for e in seen.values()):.3f} nats)")
    k = int(th.min_ratios)
    tail = [x for x in ratios[-k:] if x is not None]
    if len(ratios) >= k and len(tail) == k and all(x <= float(th.halving) for x in tail):
        return out("exhausting", f"the last {k} top-1 score ratios {[round(x, 3) for x in tail]} are all ≤ {th.halving}")
    last = later[-1]["metrics"]
    sim, sim_r = last.get("generation_similarity"), last.get("generation_similarity_random")
    kept = not _lost(last.get("task_score"), bar)
    if kept and sim is not None and sim_r is not None and sim < sim_r - float(th.similarity_margin):
        return out("multiple_solutions", f"the behaviour is kept (task score {last.get('task_score')}) but the last "
                                         f"round's generations are {sim:.2f} similar to round 0's vs {sim_r:.2f} for "
                                         "the control")
    return out("distributed", f"the suppressed units mattered before retraining, yet every round re-learned the "
                              f"behaviour within the noise ({rounds[-1]['metrics']['n_suppressed']} units suppressed)")


def idle_audit(sizes: list[int], touched) -> dict:
    """Units never recruited nor suppressed, counted per group."""
    per_layer = list(sizes)
    for group, _ in set(map(tuple, touched)):
        per_layer[group] -= 1
    total = sum(per_layer)
    return {"per_layer": per_layer, "total": total, "fraction": total / sum(sizes)}
