"""Ensembles of a tiny chain's round adapters: exactness, PEFT's linear cross terms, save, study, errors."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors.torch import load_file

from crabsweep.cli import main
from crabsweep.config import compose_config
from crabsweep.loop.ensemble import Ensembler, degeneracy, depth_grid
from crabsweep.core.models import load_model
from crabsweep.core.tasks import collate

CHAIN = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "train.epochs=3", "train.lr=1e-2",
         "k.k=4", "chain.rounds=2", "chain.control=none"]
WEIGHTS = [0.2, 0.5, 0.3]


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("ens") / "chain"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    return run


def _ecfg(*overrides):
    cfg, _ = compose_config("ensemble", ["model=tiny_llama", "task=tiny", "tracker=none", "ensemble.max_new_tokens=4",
                                         *overrides])
    return cfg.ensemble


def _logits(model, session):
    batch = collate(session.task.train, session.pad_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _by_hand(chain_dir, weights):
    """Base weights + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, read straight from the saved adapter files."""
    base = load_model(OmegaConf.load("crabsweep/conf/model/tiny_llama.yaml"), "cpu", "fp32").model
    for r, w in enumerate(weights):
        folder = chain_dir / f"round_{r}" / "adapter"
        conf = json.loads((folder / "adapter_config.json").read_text())
        s = conf["lora_alpha"] / conf["r"]
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if ".lora_A." in key:
                b = tensors[key.replace(".lora_A.", ".lora_B.")]
                name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
                base.get_submodule(name).weight.data += w * s * (b @ a)
    return base


def test_exact_equals_weighted_sum_of_delta_w_and_linear_does_not(chain_dir):
    ens = Ensembler(chain_dir, _ecfg()).load()
    weights = ens.check_weights(WEIGHTS)
    ens.combine(weights)
    ours = _logits(ens.session.model, ens.session)
    expected = _logits(_by_hand(chain_dir, weights), ens.session)
    assert (ours - expected).abs().max() < 1e-5
    a0 = load_file(str(chain_dir / "round_0" / "adapter" / "adapter_model.safetensors"))
    a1 = load_file(str(chain_dir / "round_1" / "adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a0[k], a1[k]) for k in a0 if ".lora_A." in k)        # the A's differ …
    ens.ecfg = _ecfg("ensemble.combination=linear")
    ens.combine(weights)
    assert (_logits(ens.session.model, ens.session) - expected).abs().max() > 1e-4   # … so linear ≠ Σ wᵢΔWᵢ


def test_saved_ensemble_is_a_plain_peft_adapter(chain_dir, tmp_path):
    ens = Ensembler(chain_dir, _ecfg()).load()
    weights = ens.check_weights(WEIGHTS)
    ens.save(weights, tmp_path / "best")
    in_memory = _logits(ens.session.model, ens.session)
    fresh = load_model(OmegaConf.load("crabsweep/conf/model/tiny_llama.yaml"), "cpu", "fp32").model
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "best"))
    assert (_logits(reloaded, ens.session) - in_memory).abs().max() < 1e-5


def test_weight_study_and_depth_sweep(chain_dir):
    assert main(["ensemble", str(chain_dir), "model=tiny_llama", "task=tiny", "tracker=none", "ensemble.study=true",
                 "ensemble.n_trials=3", "ensemble.depth_steps=3", "ensemble.max_new_tokens=4"]) == 0
    summary = json.loads((chain_dir / "ensemble" / "summary.json").read_text())
    assert summary["evaluations"] == 3 + 3 + 3                     # single rounds, depth sweep, study trials
    assert set(summary["single_rounds"]) == {"0", "1", "2"}
    assert summary["best"]["heldout_loss"] <= min(summary["single_rounds"].values()) + 1e-12
    rows = json.loads((chain_dir / "ensemble" / "evaluations.json").read_text())
    assert [r["kind"] for r in rows[:6]] == ["single round 0", "single round 1", "single round 2"] + ["depth sweep"] * 3
    assert all(abs(sum(r["weights"].values()) - 1) < 1e-9 for r in rows)
    assert (chain_dir / "ensemble" / "study.db").exists()


def test_depth_grid_and_degeneracy():
    assert depth_grid(3, 3) == [[1 / 3, 1 / 3, 1 / 3], [1 / 6, 1 / 6, 1 / 6 + 0.5], [0.0, 0.0, 1.0]]
    assert degeneracy("a b c d e") == 0.0 and degeneracy("go on go on go on go on") > 0.5


@pytest.mark.parametrize("extra, match", [
    (["ensemble.weights=[0.5,-0.2,0.7]"], "negative values but ensemble.simplex=true"),
    (["ensemble.rounds=[0,7]"], "rounds [7]"),
    (["ensemble.weights=[1,1]"], "2 values for 3 rounds"),
    (["ensemble.suppression=round:9"], "must be none, union or round:<r>"),
])
def test_ensemble_user_errors_exit_2(chain_dir, capsys, extra, match):
    assert main(["ensemble", str(chain_dir), "tracker=none", *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


def test_chain_dir_without_adapters_exits_2(tmp_path, capsys):
    (tmp_path / "round_0").mkdir()
    assert main(["ensemble", str(tmp_path)]) == 2
    assert "holds no round_<r>/adapter" in capsys.readouterr().err


def test_without_heldout_samples_the_loss_is_named_for_what_it_measures(tmp_path, capsys):
    task = tmp_path / "task.json"
    task.write_text(json.dumps([{"id": f"s{i}", "input": f"Rate {i}", "output": f"Verdict: {i} ok"} for i in range(3)]))
    run = tmp_path / "chain"
    assert main(["chain", "model=tiny_llama", "task=tiny", f"task.path={task}", "tracker=none", "eval.max_new_tokens=2",
                 "train.epochs=1", "chain.rounds=1", "k.k=2", f"hydra.run.dir={run}"]) == 0
    capsys.readouterr()
    assert main(["ensemble", str(run), "tracker=none", "ensemble.study=true", "ensemble.n_trials=1",
                 "ensemble.depth_steps=1", "ensemble.max_new_tokens=2"]) == 0
    out = capsys.readouterr().out
    assert "train_loss" in out and "heldout_loss" not in out
    rows = json.loads((run / "ensemble" / "evaluations.json").read_text())
    assert all("train_loss" in r and "heldout_loss" not in r for r in rows)
