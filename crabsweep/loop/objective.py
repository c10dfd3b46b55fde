"""What a round's suppression did to the behaviour, against its matched random control — the numbers the
trajectory classes and the sweep's objective are made of.

For round r with suppressed set S and its matched random set R (same size per layer), relative to round 0:

    ΔH(X) = behaviour-token CE of the round trained under X − round 0's   (the task's own tokens: section
                                                                            headers, JSON keys, …)
    ΔO(X) = content-token CE (the rest of the answer) − round 0's
    C(X)  = collateral: base model + mask X on unrelated text − base model (no adapter)

    J = [ΔH(S) − ΔH(R)] − λ·[C(S) − C(R)]₊ − μ·[ΔO(S) − ΔO(R)]₊          `selectivity_total` (nats)
    selectivity = J / |S|                                                   (nats per suppressed unit)

A matched random set scores ≈ 0 by construction; a set that breaks general machinery pays its collateral
and content damage; a set that hurts the behaviour but not unrelated text scores high. Dividing by |S|
compares chains with different K per suppressed unit, so a larger K does not win by size alone.
When the task marks no behaviour tokens, the held-out (else train) loss stands in for H (recorded).

The gate: a chain whose round 0 did not learn the behaviour (held-out task score below
`chain.gate.min_task_score`, or behaviour CE above `chain.gate.max_behaviour_ce`) has no trajectory.
"""

from __future__ import annotations


def _h(m: dict) -> float | None:
    for key in ("behaviour_ce", "heldout_loss", "final_loss"):
        if m.get(key) is not None:
            return m[key]
    return None


def _h_key(m: dict) -> str:
    return next((k for k in ("behaviour_ce", "heldout_loss", "final_loss") if m.get(k) is not None), "final_loss")


def _diff(a, b):
    return None if a is None or b is None else a - b


def against_control(main: dict, control: dict, round0: dict, ocfg) -> dict:
    """The round's metrics against its control and round 0: *_random copies, gaps, J and selectivity."""
    lam, mu = float(ocfg.collateral_weight), float(ocfg.content_weight)
    key = _h_key(round0)
    h0, o0 = round0.get(key), round0.get("content_ce")
    out = {f"{k}_random": control.get(k) for k in ("final_gap", "behaviour_ce", "content_ce", "collateral", "damage",
                                                     "task_score", "heldout_loss")}
    out["specificity"] = _diff(main["final_gap"], control["final_gap"])
    dh_s, dh_r = _diff(main.get(key), h0), _diff(control.get(key), h0)
    do_s, do_r = _diff(main.get("content_ce"), o0), _diff(control.get("content_ce"), o0)
    out.update({"behaviour_gap": dh_s, "behaviour_gap_random": dh_r, "content_gap": do_s, "content_gap_random": do_r,
                "objective_basis": key})
    if dh_s is None or dh_r is None:
        out["selectivity_total"] = out["selectivity"] = None
        return out
    j = (dh_s - dh_r) - lam * max(main["collateral"] - control["collateral"], 0.0)
    if do_s is not None and do_r is not None:
        j -= mu * max(do_s - do_r, 0.0)
    out["selectivity_total"] = j
    out["selectivity"] = j / max(int(main["n_suppressed"]), 1)
    return out


def learned(round0: dict, gate) -> tuple[bool, str]:
    """Did round 0 learn the behaviour? (passed, reason)."""
    score, bar = round0.get("task_score"), gate.get("min_task_score")
    if bar is not None and score is not None and score < float(bar):
        return False, (f"round 0 did not learn: held-out task score {score:.3f} < {bar} (chain.gate.min_task_score); "
                       "raise train.lr or train.epochs")
    ce, ce_bar = round0.get("behaviour_ce"), gate.get("max_behaviour_ce")
    if ce_bar is not None and ce is not None and ce > float(ce_bar):
        return False, (f"round 0 did not learn: behaviour-token CE {ce:.3f} > {ce_bar} (chain.gate.max_behaviour_ce); "
                       "raise train.lr or train.epochs")
    if bar is not None and score is None and ce_bar is None:
        return True, "round 0's task score was not measured (no held-out samples or no generation); not gated"
    return True, "round 0 learned the behaviour"
