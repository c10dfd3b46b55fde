"""Chains side by side: per-round metrics, trajectory classes, and how much their recruits agree.

For every pair of chains and every round both ran: the Jaccard index of the units each selected that
round (and of the suppressed sets S after it), and the rank correlation (Spearman's ρ and Kendall's τ)
of the order in which each ranked the units they share. For a study folder, the same between every
pair of its trials, as matrices over the swept parameters (e.g. attribution method × K): the seed's
warning "different choices give different recruit orderings", measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import pandas as pd

from ..errors import UserError
from .records import metric_names, round_rows, unit_label


def jaccard(a, b) -> float | None:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else None


def _shared_ranks(a: list, b: list) -> tuple[list[int], list[int]]:
    """Ranks (0..n-1) of the units both lists hold, within each list's order."""
    shared = set(a) & set(b)
    ra = {u: i for i, u in enumerate(x for x in a if x in shared)}
    rb = {u: i for i, u in enumerate(x for x in b if x in shared)}
    order = sorted(shared, key=ra.get)
    return [ra[u] for u in order], [rb[u] for u in order]


def spearman(a: list, b: list) -> float | None:
    """Spearman's ρ of two rankings on the units they share (None below 2 shared units)."""
    x, y = _shared_ranks(a, b)
    n = len(x)
    if n < 2:
        return None
    return 1 - 6 * sum((i - j) ** 2 for i, j in zip(x, y)) / (n * (n * n - 1))


def kendall(a: list, b: list) -> float | None:
    """Kendall's τ of two rankings on the units they share (None below 2 shared units)."""
    x, y = _shared_ranks(a, b)
    n = len(x)
    if n < 2:
        return None
    s = sum((1 if (x[i] - x[j]) * (y[i] - y[j]) > 0 else -1) for i, j in combinations(range(n), 2))
    return s / (n * (n - 1) / 2)


@dataclass
class Comparison:
    """`metrics`: one row per (round, metric), one column per chain; `trajectories`: one row per chain;
    `overlap`: one row per (round, pair of chains); `matrices` (study folders): name → chains × chains."""
    chains: dict[str, dict]
    metrics: pd.DataFrame
    trajectories: pd.DataFrame
    overlap: pd.DataFrame
    matrices: dict[str, pd.DataFrame] = field(default_factory=dict)
    study: str | None = None


def _suppressed_after(chain: dict, r: int) -> set[str]:
    rec = chain["rounds"][r]
    return {unit_label(u) for u in rec["suppressed"]} | {unit_label(x["unit"]) for x in rec["recruits"]["selected"]}


def _selected(chain: dict, r: int) -> list[str]:
    return [unit_label(x["unit"]) for x in chain["rounds"][r]["recruits"]["selected"]]


def pair_overlap(a: dict, b: dict, r: int) -> dict:
    sa, sb = _selected(a, r), _selected(b, r)
    return {"n_a": len(sa), "n_b": len(sb), "shared": len(set(sa) & set(sb)), "jaccard": jaccard(sa, sb),
            "jaccard_S": jaccard(_suppressed_after(a, r), _suppressed_after(b, r)),
            "spearman": spearman(sa, sb), "kendall": kendall(sa, sb)}


def compare_chains(chains: dict[str, dict], study: str | None = None) -> Comparison:
    """`chains`: name → chain.json record."""
    if len(chains) < 2:
        raise UserError("compare needs at least two chains; pass two or more chain folders, or one study folder")
    names = metric_names([rec for c in chains.values() for rec in c["rounds"]])
    rows = []
    n_rounds = max(len(c["rounds"]) for c in chains.values())
    for r in range(n_rounds):
        per = {name: (round_rows(c)[r] if r < len(c["rounds"]) else {}) for name, c in chains.items()}
        rows += [{"round": r, "metric": m, **{name: per[name].get(m) for name in chains}} for m in names]
    metrics = pd.DataFrame(rows).set_index(["round", "metric"])
    traj = pd.DataFrame([{"chain": name, "class": c["trajectory"]["class"], "reason": c["trajectory"]["reason"],
                          "rounds": len(c["rounds"]), "stopped": c.get("stopped")} for name, c in chains.items()])
    overlap = []
    for (na, a), (nb, b) in combinations(chains.items(), 2):
        for r in range(min(len(a["rounds"]), len(b["rounds"]))):
            overlap.append({"round": r, "a": na, "b": nb, **pair_overlap(a, b, r)})
    return Comparison(chains, metrics, traj.set_index("chain"), pd.DataFrame(overlap), study=study)


def overlap_matrix(chains: dict[str, dict], what: str, r: int | None = None) -> pd.DataFrame:
    """chains × chains: `what` ∈ jaccard | spearman | kendall | jaccard_S of round r (None: each chain's last
    round for jaccard_S, i.e. the final suppressed sets)."""
    names = list(chains)
    out = pd.DataFrame(index=names, columns=names, dtype=float)
    for na in names:
        for nb in names:
            a, b = chains[na], chains[nb]
            if r is None:
                v = jaccard(_suppressed_after(a, -1), _suppressed_after(b, -1))
            elif r < len(a["rounds"]) and r < len(b["rounds"]):
                v = pair_overlap(a, b, r)[what]
            else:
                v = None
            out.loc[na, nb] = float("nan") if v is None else v
    return out


def study_chains(study_dir: Path) -> tuple[str, dict[str, dict]]:
    """A study's chains that finished (complete or pruned), named by their swept parameters."""
    from .. import io
    from .report import load, run_dir_of
    meta, study = load(study_dir)
    found: dict[str, dict] = {}
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: tuple(repr(v) if not isinstance(v, (int, float))
                                                                        else v for _, v in sorted(t.params.items())))
    for t in trials:
        run = run_dir_of(t, study_dir)
        if run is None or not (run / "chain.json").exists():
            continue
        label = " ".join(str(v) for _, v in sorted(t.params.items())) or f"trial {t.number}"
        if label in found:
            label = f"{label} (t{t.number})"
        found[label] = io.read_json(run / "chain.json")
    return meta["study"], found


def compare(*dirs: str | Path, round: int = 0) -> Comparison:  # noqa: A002 — `round` is the domain word
    """Chains (two or more chain folders) or a study folder's chains side by side; a study also gets
    overlap matrices of round `round` (jaccard, spearman, kendall) and of the final suppressed sets."""
    from .. import io
    paths = [Path(d) for d in dirs]
    if len(paths) == 1 and (paths[0] / "sweep.json").exists():
        name, chains = study_chains(paths[0])
        if len(chains) < 2:
            raise UserError(f"{paths[0]} has {len(chains)} finished chain(s); compare needs two (run more trials)")
        out = compare_chains(chains, study=name)
        out.matrices = {f"{m} (round {round})": overlap_matrix(chains, m, round) for m in ("jaccard", "spearman")}
        out.matrices["jaccard of the final suppressed sets"] = overlap_matrix(chains, "jaccard_S", None)
        return out
    chains = {}
    for p in paths:
        if (p / "sweep.json").exists():
            raise UserError(f"{p} is a study folder; compare one study folder alone, or chain folders together")
        if not (p / "chain.json").exists():
            raise UserError(f"{p} holds no chain.json; pass folders of finished chains (or one study folder)")
        name = p.name if p.name not in chains else str(p)
        chains[name] = io.read_json(p / "chain.json")
    return compare_chains(chains)
