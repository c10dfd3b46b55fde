"""Every option of every config group runs a 2-round chain on a tiny model; K policies; refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from crabsweep.cli import main
from crabsweep.errors import UserError
from crabsweep.io import read_json
from crabsweep.methods.selection import check_k, normalize, select

CONF = Path(__file__).resolve().parent.parent / "crabsweep" / "conf"
BASE = ["model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4", "train.epochs=1",
        "chain.rounds=2", "k.k=3", "chain.control=last"]
# options that need a partner setting to be meaningful on their own
PARTNERS = {
    ("model", "tiny_moe"): ["suppression=moe_expert", "attribution=grad_x_act", "k.k=1"],
    ("suppression", "moe_expert"): ["model=tiny_moe", "attribution=grad_x_act", "k.k=1"],
    ("suppression", "residual_dim"): ["attribution=grad_x_act"],
    ("suppression", "attention_head"): ["k.k=1"],
    ("k", "fraction"): ["k.fraction=0.03"],
    ("k", "mass"): ["k.mass=0.05", "k.cap=5"],
    # a random-init model never learns a real task: the round-0 gate is tested in test_trust
    ("task", "critique"): ["task.max_prompt_tokens=64", "+task.heldout=[ferry]", "chain.gate.min_task_score=null"],
    ("task", "json_extract"): ["task.max_prompt_tokens=64", "chain.gate.min_task_score=null"],
    ("adapter", "full"): ["attribution=grad_x_act", "train.lr=1e-3"],
    ("suppression", "dictionary_feature"): ["suppression.path={sae}", "k.k=2"],
    ("experiment", "dictionary_compare"): ["suppression.path={cc}", "k.k=2"],     # the crosscoder, here a tiny one
    ("adapter", "prompt_tuning"): ["attribution=grad_x_act", "train.lr=1e-2"],
}
SKIP = {("model", "smollm2_135m"), ("model", "gemma3_270m"), ("model", "hf"),   # real / external weights
        ("tracker", "wandb_online")}                                           # needs network and a login
OPTIONS = [(g.name, f.stem) for g in sorted(CONF.iterdir()) if g.is_dir() and g.name != "sweep"
           for f in sorted(g.glob("*.yaml")) if (g.name, f.stem) not in SKIP]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_runs_a_two_round_chain(tmp_path, tiny_dictionaries, group, option):
    run = tmp_path / "run"
    extra = [e.format(**tiny_dictionaries) for e in PARTNERS.get((group, option), [])]
    if group == "task" and option != "tiny":
        extra = [e for e in extra if not e.startswith("+task.heldout")]
    base = [b for b in BASE if not (b == "k.k=3" and group == "k" and option not in ("fixed", "per_layer"))]
    choice = f"+{group}={option}" if group == "experiment" else f"{group}={option}"   # presets are added
    assert main(["chain", *base, choice, *extra, f"hydra.run.dir={run}"]) == 0
    chain = read_json(run / "chain.json")
    assert [r["round"] for r in chain["rounds"]] == [0, 1, 2]
    for prev, cur in zip(chain["rounds"], chain["rounds"][1:]):
        assert len(cur["suppressed"]) == len(prev["suppressed"]) + len(prev["recruits"]["selected"]) > 0


@pytest.mark.parametrize("mode", ["zero", "mean", "multiplier"])
def test_every_suppression_mode_runs(tmp_path, mode):
    assert main(["chain", *BASE, f"suppression.mode={mode}", "suppression.scale=0.5",
                 f"hydra.run.dir={tmp_path / 'run'}"]) == 0


@pytest.mark.parametrize("extra, match", [
    (["suppression=residual_dim", "attribution=lora_a_grad"], "attribution=lora_a_grad is not defined for suppression=residual_dim"),
    (["model=tiny_moe", "suppression=moe_expert", "attribution=relp"], "attribution=relp is not defined for suppression=moe_expert"),
    (["model=tiny_moe", "suppression=moe_expert", "attribution=grad_x_act", "suppression.mode=mean"],
     "suppression.mode=mean is not defined for suppression=moe_expert"),
    (["attribution.normalize=rank"], "attribution.normalize='rank': Input should be 'none' or 'layer_zscore'"),
    (["suppression=moe_expert", "attribution=grad_x_act"], "needs an MoE model"),
    (["k=schedule", "k.per_round=[3,0]"], "k.per_round.1=0: Input should be greater than or equal to 1"),
    (["k=fraction", "k.fraction=1.5"], "k.fraction=1.5: Input should be less than or equal to 1"),
    (["adapter=prompt_tuning", "attribution=lora_a_grad"], "attribution=lora_a_grad needs adapter=lora"),
])
def test_impossible_combinations_are_refused_with_exit_2(tmp_path, capsys, extra, match):
    base = [b for b in BASE if b != "k.k=3"] if any(e.startswith("k=") for e in extra) else BASE
    assert main(["chain", *base, *extra, f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def _k(**kw):
    return OmegaConf.create({"cap": None, **kw})


SCORES = [torch.tensor([5.0, 1.0, 0.5, 0.1]), torch.tensor([4.0, 3.0, 0.2, 0.2])]


def _units(picked):
    return [(x["unit"]["layer"], x["unit"]["index"]) for x in picked]


def test_k_policies_select_what_they_say():
    excluded = {(0, 0)}
    assert _units(select(SCORES, excluded, _k(policy="fixed", k=3), 0)) == [(1, 0), (1, 1), (0, 1)]
    sched = _k(policy="schedule", per_round=[1, 2])
    assert len(select(SCORES, excluded, sched, 0)) == 1 and len(select(SCORES, excluded, sched, 5)) == 2
    assert len(select(SCORES, excluded, _k(policy="fraction", fraction=0.5), 0)) == 4
    # mass: remaining mass 9.2; 4 + 3 = 7 < 0.8 × 9.2 = 7.36 ≤ 8 → three units
    assert _units(select(SCORES, excluded, _k(policy="mass", mass=0.8), 0)) == [(1, 0), (1, 1), (0, 1)]
    assert _units(select(SCORES, excluded, _k(policy="per_layer", k=1), 0)) == [(1, 0), (0, 1)]
    assert len(select(SCORES, excluded, _k(policy="fixed", k=3, cap=2), 0)) == 2


def test_layer_zscore_compares_layers_of_different_scale():
    scores = [torch.tensor([100.0, 101.0, 99.0]), torch.tensor([1.0, 5.0, 0.0])]
    assert _units(select(scores, set(), _k(policy="fixed", k=1), 0)) == [(0, 1)]
    picked = select(scores, set(), _k(policy="fixed", k=1), 0, how="layer_zscore")
    assert _units(picked) == [(1, 1)] and picked[0]["score"] == 5.0          # raw score recorded
    z = normalize(scores, "layer_zscore")
    assert all(abs(float(t.mean())) < 1e-6 for t in z)


def test_check_k_refuses_impossible_k():
    with pytest.raises(UserError, match="exceeds the 8 units"):
        check_k(_k(policy="fixed", k=3), [4, 4], n_start=0, rounds=3)
    with pytest.raises(UserError, match="exceeds"):
        check_k(_k(policy="per_layer", k=2), [4, 4], n_start=1, rounds=2)
    check_k(_k(policy="mass", mass=0.5, cap=2), [4, 4], n_start=0, rounds=3)
