"""The trajectory rules and the selective objective on synthetic records: each case the old rules got
wrong, and each class's positive case, decided against the control (and the seed spread)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from crabsweep.loop.objective import against_control, learned
from crabsweep.loop.trajectory import classify

TH = OmegaConf.create({"floor": 0.05, "specific_fraction": 0.5, "collateral_fraction": 0.5, "seed_k": 2.0,
                       "min_ratios": 3, "halving": 0.6, "similarity_margin": 0.1})
BAR = 0.75
GATE_OK = (True, "")


def _round(r, gap=0.0, gap_r=0.0, coll=0.0, coll_r=0.0, dh=None, dh_r=None, score=1.0, score_r=1.0, damage=0.0,
           damage_r=0.0, top1=1.0, sim=None, sim_r=None, control=True, n=16):
    m = {"final_gap": gap, "collateral": coll, "damage": damage, "task_score": score, "top1_score": top1,
         "n_suppressed": n * r, "behaviour_gap": dh, "generation_similarity": sim}
    if control:
        m.update({"final_gap_random": gap_r, "collateral_random": coll_r, "damage_random": damage_r,
                  "task_score_random": score_r, "behaviour_gap_random": dh_r, "generation_similarity_random": sim_r})
    return {"round": r, "metrics": m, "generations": []}


def _chain(*later, top0=1.0):
    return [_round(0, top1=top0, control=False)] + list(later)


def _cls(rounds, gate=GATE_OK, spreads=None):
    return classify(rounds, TH, gate, BAR, spreads)


# -- the cases the old rules mislabelled --------------------------------------------------------------------
def test_a_gap_the_random_control_matches_is_nonspecific():
    # 3.0-nat gap, 2.5-nat random gap: the old absolute test (spec ≤ gap/2 = 1.5) called this single_point
    assert _cls(_chain(_round(1, gap=3.0, gap_r=2.5)))["class"] == "nonspecific_damage"


def test_no_control_in_the_moving_round_is_undetermined():
    rounds = _chain(_round(1, gap=0.01), _round(2, gap=2.0, control=False))
    t = _cls(rounds)
    assert t["class"] == "undetermined" and "no matched random control" in t["reason"] and "round 2" in t["reason"]


def test_collateral_without_a_large_gap_is_infrastructure():
    # collateral 3.0 with gap 0.45: the old rules (gap below 0.5) called it distributed
    assert _cls(_chain(_round(1, gap=0.45, coll=3.0, coll_r=0.02)))["class"] == "infrastructure_damage"


def test_lost_behaviour_is_not_multiple_solutions():
    # degenerate text: task score 1 → 0 with a small loss gap and dissimilar output (old: multiple_solutions)
    specific = _chain(_round(1, gap=0.02, score=0.0, score_r=1.0, sim=0.1, sim_r=0.9))
    assert _cls(specific)["class"] == "single_point"
    both = _chain(_round(1, gap=0.02, score=0.0, score_r=0.0, sim=0.1, sim_r=0.1))
    assert _cls(both)["class"] == "nonspecific_damage"


def test_one_noisy_top1_ratio_is_not_exhausting():
    rounds = _chain(_round(1, top1=0.5, damage=0.3))        # one ratio of 0.5: the old rule said exhausting
    assert _cls(rounds)["class"] == "distributed"
    halving = _chain(*[_round(r, top1=0.5 ** r, damage=0.3) for r in (1, 2, 3)])
    assert _cls(halving)["class"] == "exhausting"


def test_nothing_measurable_is_inconclusive_not_distributed():
    # 16 of 46,080 units, no measurable effect of S or R, and the mask alone costs nothing either
    rounds = _chain(_round(1, gap=0.003, gap_r=0.001, coll=0.001, damage=0.002, damage_r=0.001))
    t = _cls(rounds)
    assert t["class"] == "inconclusive" and "16 suppressed units" in t["reason"]


# -- positive cases ------------------------------------------------------------------------------------------
def test_specific_behaviour_loss_is_single_point():
    rounds = _chain(_round(1, gap=0.1, dh=1.2, dh_r=0.05, gap_r=0.02, coll=0.1, coll_r=0.05))
    t = _cls(rounds)
    assert t["class"] == "single_point" and t["evidence"]["rounds"][1]["specific"]


def test_mattered_then_recovered_is_distributed_and_divergence_beyond_control_is_multiple_solutions():
    assert _cls(_chain(_round(1, damage=0.4, damage_r=0.05, sim=0.8, sim_r=0.85)))["class"] == "distributed"
    assert _cls(_chain(_round(1, damage=0.4, damage_r=0.05, sim=0.3, sim_r=0.85)))["class"] == "multiple_solutions"
    # without the control's similarity (the noise floor) divergence is not claimed
    assert _cls(_chain(_round(1, damage=0.4, damage_r=0.05, sim=0.3, sim_r=None)))["class"] == "distributed"


def test_round0_gate_and_seed_spread():
    rounds = _chain(_round(1, gap=2.0))
    t = _cls(rounds, gate=(False, "round 0 did not learn: held-out task score 0.125 < 0.75"))
    assert t["class"] == "undetermined" and "did not learn" in t["reason"]
    assert _cls(_chain(_round(1, gap=0.0, gap_r=0.0)))["class"] == "inconclusive"
    # a 0.3-nat specific effect is single_point when seeds agree, but noise when they spread by 0.2 nats
    effect = _chain(_round(1, dh=0.3, dh_r=0.0))
    assert _cls(effect, spreads=[0.0, 0.0])["class"] == "single_point"
    assert _cls(effect, spreads=[0.0, 0.2])["class"] in ("inconclusive", "distributed")
    passed, _ = learned({"task_score": 0.5}, OmegaConf.create({"min_task_score": 0.75, "max_behaviour_ce": None}))
    assert not passed
    passed, _ = learned({"task_score": 1.0, "behaviour_ce": 2.0},
                        OmegaConf.create({"min_task_score": 0.75, "max_behaviour_ce": 0.5}))
    assert not passed


# -- the objective ------------------------------------------------------------------------------------------
OBJ = OmegaConf.create({"collateral_weight": 1.0, "content_weight": 1.0})


def _obj(main, control, round0=None):
    round0 = round0 or {"behaviour_ce": 0.1, "content_ce": 3.0}
    return against_control({"final_gap": 0.0, "n_suppressed": 16, **main}, {"final_gap": 0.0, **control}, round0, OBJ)


@pytest.mark.parametrize("case, expected", [
    # a matched random set against another: no difference → 0
    (({"behaviour_ce": 0.4, "content_ce": 3.1, "collateral": 0.02}, {"behaviour_ce": 0.4, "content_ce": 3.1,
                                                                     "collateral": 0.02}), 0.0),
    # infrastructure: big behaviour gap, but collateral 3.14 and content +1.0 → (2.0 − 0.0) − 3.12 − 1.0
    (({"behaviour_ce": 2.1, "content_ce": 4.0, "collateral": 3.14}, {"behaviour_ce": 0.1, "content_ce": 3.0,
                                                                     "collateral": 0.02}), (2.0 - 3.12 - 1.0) / 16),
    # behaviour-specific: +1.5 on the headers, unrelated text and content untouched → 1.5 / 16
    (({"behaviour_ce": 1.6, "content_ce": 3.0, "collateral": 0.01}, {"behaviour_ce": 0.1, "content_ce": 3.05,
                                                                     "collateral": 0.02}), 1.5 / 16),
])
def test_selectivity_formula(case, expected):
    out = _obj(*case)
    assert out["selectivity"] == pytest.approx(expected, abs=1e-12)
    assert out["selectivity_total"] == pytest.approx(expected * 16, abs=1e-12)


def test_objective_falls_back_to_heldout_loss_without_behaviour_tokens():
    out = _obj({"heldout_loss": 2.5, "content_ce": None, "collateral": 0.0},
               {"heldout_loss": 2.0, "content_ce": None, "collateral": 0.0}, {"heldout_loss": 1.8, "content_ce": None})
    assert out["objective_basis"] == "heldout_loss" and out["selectivity"] == pytest.approx(0.5 / 16)
