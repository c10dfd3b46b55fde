"""Reading a chain's records for people: per-round scalar metrics, recruit and generation rows.

Metrics are whatever scalars a round record holds (new ones show up without code changes); PREFERRED
fixes the order of the familiar ones and the subset a narrow terminal table shows.
"""

from __future__ import annotations

# the order metrics are shown in; any other scalar metric follows, in record order
PREFERRED = (
    "n_suppressed", "init_loss", "final_loss", "delta_loss", "final_gap", "final_gap_random", "specificity",
    "selectivity", "behaviour_ce", "behaviour_ce_random", "content_ce", "content_ce_random", "damage",
    "damage_random", "collateral", "collateral_random", "heldout_loss", "heldout_loss_random", "task_score",
    "task_score_random", "task_score_mask_off", "top1_score", "layers_with_recruits",
)
# what a terminal table shows when it cannot show everything
CORE = ("n_suppressed", "final_loss", "final_gap", "final_gap_random", "specificity", "selectivity",
        "behaviour_ce", "content_ce", "damage", "collateral", "heldout_loss", "task_score", "top1_score")


def is_scalar(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def scalar_metrics(metrics: dict) -> dict:
    """The scalar metrics of one round, familiar ones first (PREFERRED order), then the rest."""
    known = [k for k in PREFERRED if k in metrics and is_scalar(metrics[k])]
    rest = [k for k, v in metrics.items() if k not in PREFERRED and is_scalar(v)]
    return {k: metrics[k] for k in known + rest}


def metric_names(rounds: list[dict]) -> list[str]:
    """Every scalar metric any of `rounds` (records with a `metrics` dict) has, in display order."""
    seen: dict[str, None] = {}
    for rec in rounds:
        seen.update(dict.fromkeys(scalar_metrics(rec["metrics"])))
    order = [k for k in PREFERRED if k in seen]
    return order + [k for k in seen if k not in order]


def round_rows(chain: dict) -> list[dict]:
    """One row per round: `round` and every scalar metric."""
    return [{"round": rec["round"], **scalar_metrics(rec["metrics"])} for rec in chain["rounds"]]


def unit_label(u: dict) -> str:
    """'L3:17' for per-layer units, the values joined by ':' otherwise."""
    if "layer" in u and "index" in u:
        return f"L{u['layer']}:{u['index']}"
    return ":".join(str(v) for v in u.values())


def selected(chain: dict, r: int) -> list[str]:
    """Round r's selected units (the ones added to S), best first."""
    return [unit_label(x["unit"]) for x in chain["rounds"][r]["recruits"]["selected"]]


def recruit_rows(chain: dict) -> list[dict]:
    """One row per (round, method, unit) for every selected unit (method = the ranking method) and every
    entry of every per-method top list; `selected`: the unit joined S this round, `top`: it is on that
    method's top list, `rank`: its place in the selection (ranking method) or in the top list."""
    rows = []
    for rec in chain["rounds"]:
        r, rc = rec["round"], rec["recruits"]
        tops = {m: {unit_label(x["unit"]) for x in ranked} for m, ranked in (rc.get("top") or {}).items()}
        chosen = {unit_label(x["unit"]) for x in rc["selected"]}
        for i, x in enumerate(rc["selected"]):
            rows.append({"round": r, "method": rc["method"], "unit": unit_label(x["unit"]), **x["unit"],
                         "score": x["score"], "rank": i, "selected": True,
                         "top": unit_label(x["unit"]) in tops.get(rc["method"], set())})
        for method, ranked in (rc.get("top") or {}).items():
            for i, x in enumerate(ranked):
                label = unit_label(x["unit"])
                if method == rc["method"] and label in chosen:
                    continue                                  # already a row of the selection
                rows.append({"round": r, "method": method, "unit": label, **x["unit"], "score": x["score"],
                             "rank": i, "selected": label in chosen, "top": True})
    return rows


RECRUIT_COLUMNS = ["round", "layer", "index", "score", "method", "selected", "rank", "top", "unit"]
GENERATION_COLUMNS = ["round", "id", "mask", "task_score", "prompt", "text"]


def generation_rows(chain: dict) -> list[list]:
    return [[rec["round"], g["id"], g.get("mask"), g.get("score"), g.get("prompt"), g["text"]]
            for rec in chain["rounds"] for g in rec.get("generations") or []]
