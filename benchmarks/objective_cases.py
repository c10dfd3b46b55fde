"""Does the selective objective mean what it says? Three suppression sets on the embedded model.

    python benchmarks/objective_cases.py [overrides …]         (SmolLM2 / critique by default; ~7 rounds)

Round 0 is trained once (nothing suppressed). Then, for sets S of `--size` units, one round under S and one
under a matched random set R (same count per layer), and the objective of loop/objective.py:
  random          S is itself a random set → J should be ≈ 0
  infrastructure  S = round 0's top `lora_a_grad` recruits (activation-scaled; on SmolLM2 they include the
                  massive-activation unit L11:1229) → large final gap, but J low (collateral, content damage)
  behaviour       S = units whose |grad × activation| on the behaviour tokens (section headers, round-0
                  adapter live) is largest relative to the same on unrelated text (base model; a
                  first-order estimate of each unit's collateral), massive-activation units left out,
                  at each `--behaviour-sizes` → J high once S is large enough that retraining cannot
                  route the behaviour around it
Prints one row per case; the figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import crabsweep as cs
from crabsweep.core.observers import GradientProduct
from crabsweep.core.tasks import collate
from crabsweep.loop.metrics import baselines, peak_ratio
from crabsweep.loop.objective import against_control
from crabsweep.loop.train import token_ce
from crabsweep.methods import rank
from crabsweep.methods.selection import matched_random


def behaviour_attribution(session) -> list[torch.Tensor]:
    """|Σ a·∂H/∂a| per unit, H = CE of the behaviour tokens of the train answers, round-0 adapter live."""
    acc = GradientProduct(session.basis)
    with session.observe(acc):
        for ex in session.task.train:
            batch = collate([ex], session.pad_id)
            ce, answer = token_ce(session.model, batch, session.device)
            sel = batch["behaviour"][:, answer] & (batch["labels"][:, answer] != -100)
            ce[sel].mean().backward()
    session.model.zero_grad(set_to_none=True)
    return [t.abs().float() for t in acc.totals]


def generic_attribution(session) -> list[torch.Tensor]:
    """|Σ a·∂L/∂a| per unit, L = CE of the unrelated text, base model (adapter off)."""
    acc = GradientProduct(session.basis)
    with session.adapter.disabled(), session.observe(acc):
        for ex in baselines(session)["generic"]:
            batch = collate([ex], session.pad_id)
            ce, answer = token_ce(session.model, batch, session.device)
            ce[batch["labels"][:, answer] != -100].mean().backward()
    session.model.zero_grad(set_to_none=True)
    return [t.abs().float() for t in acc.totals]


def behaviour_sets(session, sizes: list[int]) -> dict[str, list]:
    """The largest behaviour/unrelated attribution ratios (non-massive units), one set per size."""
    b, g = behaviour_attribution(session), generic_attribution(session)
    floor = float(torch.cat(g).median())
    ratio = [bb / (gg + floor) for bb, gg in zip(b, g)]
    ranked = [session.basis.unit_from_json(x["unit"]) for x in rank(ratio, set(), 4 * max(sizes))]
    ranked = [u for u in ranked if peak_ratio(session, u) < 100.0]
    return {f"behaviour ({n})": ranked[:n] for n in sizes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--behaviour-sizes", default="16,256,1024", help="sizes of the behaviour sets (comma-separated)")
    p.add_argument("--cases", default="random,infrastructure,behaviour", help="which cases to run")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    session = cs.load_session("tracker=none", "eval.mask_off=false", *args.overrides)
    t0 = time.perf_counter()
    r0 = cs.run_round(session, [])
    m0 = r0.metrics
    print(f"round 0: task score {m0['task_score']}, behaviour CE {m0['behaviour_ce']:.3f}, content CE "
          f"{m0['content_ce']:.3f}, final loss {m0['final_loss']:.3f}", flush=True)
    seed = int(session.cfg.seed)
    sizes = session.basis.sizes
    every = session.basis.units()
    pick = torch.randperm(len(every), generator=torch.Generator().manual_seed(seed + 7))[:args.size]
    cases = args.cases.split(",")
    sets = {"random": sorted(every[i] for i in pick.tolist())}     # uniformly random units of the whole model
    sets["infrastructure"] = [session.basis.unit_from_json(x["unit"])
                              for x in rank(r0.scores["lora_a_grad"], set(), args.size)]
    sets = {k: v for k, v in sets.items() if k in cases}
    if "behaviour" in cases:                                      # the round-0 adapter is still live
        sets.update(behaviour_sets(session, [int(n) for n in args.behaviour_sizes.split(",")]))
    rows = []
    for name, S in sets.items():
        main_m = _round_metrics(session, S, m0)
        R = matched_random(S, sizes, seed * 1000 + 1)
        ctrl_m = _round_metrics(session, R, m0)
        out = against_control(main_m, ctrl_m, m0, session.cfg.chain.objective)
        row = {"case": name, "n": len(S), "final_gap": main_m["final_gap"], "final_gap_random": ctrl_m["final_gap"],
               "behaviour_gap": out["behaviour_gap"], "behaviour_gap_random": out["behaviour_gap_random"],
               "content_gap": out["content_gap"], "collateral": main_m["collateral"],
               "collateral_random": ctrl_m["collateral"], "task_score": main_m["task_score"],
               "task_score_random": ctrl_m["task_score"], "selectivity_total": out["selectivity_total"],
               "selectivity": out["selectivity"],
               "units": [f"L{g}:{i}" for g, i in S][:8] + (["…"] if len(S) > 8 else []),
               "massive_in_set": sum(peak_ratio(session, u) >= 100.0 for u in S)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'case':18s} {'|S|':>4s} {'gap S/R':>13s} {'ΔH S/R':>13s} {'ΔO S':>7s} {'C S/R':>13s} "
          f"{'score S/R':>11s} {'J':>8s} {'J/|S|':>8s}")
    for r in rows:
        print(f"{r['case']:18s} {r['n']:4d} {r['final_gap']:6.3f}/{r['final_gap_random']:6.3f} "
              f"{r['behaviour_gap']:6.3f}/{r['behaviour_gap_random']:6.3f} {r['content_gap']:7.3f} "
              f"{r['collateral']:6.3f}/{r['collateral_random']:6.3f} {r['task_score']:5.2f}/{r['task_score_random']:5.2f} "
              f"{r['selectivity_total']:8.3f} {r['selectivity']:8.4f}")
    print(f"\n{time.perf_counter() - t0:.0f}s")


def _round_metrics(session, units, m0) -> dict:
    m = cs.run_round(session, units, index=1).metrics
    return {**m, "final_gap": m["final_loss"] - m0["final_loss"]}


if __name__ == "__main__":
    main()
