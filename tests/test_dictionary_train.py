"""The TopK trainer recovers planted features; `crabsweep dictionary train|info|compare` end to end on a tiny
model (the saved folder read back by the SAELens schema's maths); Crab Step chains over dictionary features."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import crabsweep as cs
from crabsweep.cli import main
from crabsweep.dictionary.formats import Dictionary, load_dictionary, save_dictionary
from crabsweep.dictionary.sites import Site
from crabsweep.dictionary.train import evaluate, train_topk

from .test_cli import _one_line_error

TINY = ["model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4"]


def planted(n, d=16, n_true=48, active=4, seed=0):
    """x = Σ_j a_j·t_j over `active` random true unit directions t_j, a_j ~ U(1, 3), plus an offset and noise."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n_true, d, generator=g)
    true = true / true.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_true, generator=g).topk(active, dim=1).indices
    coef = torch.zeros(n, n_true).scatter_(1, idx, 1 + 2 * torch.rand(n, active, generator=g))
    return coef @ true + 0.5 + 0.01 * torch.randn(n, d, generator=g), true


def pca_fvu(X, train, rank):
    """FVU of the best rank-`rank` linear reconstruction fitted on `train` (the dense baseline)."""
    mean = train.mean(0)
    basis = torch.linalg.svd(train - mean, full_matrices=False).Vh[:rank]
    c = X - mean
    return float((c - c @ basis.T @ basis).pow(2).sum() / (X - X.mean(0)).pow(2).sum())


def test_topk_trainer_recovers_planted_features_and_reports_fvu_exactly():
    X, true = planted(14000)
    dic, history = train_topk(X[:12000, None], [Site(0)], width=96, k=4, steps=400, batch_size=256, seed=0,
                              progress=False)
    held = X[12000:, None]
    ev = evaluate(dic, held)
    f = dic.encode(held)                                                  # FVU, independently
    fvu = (held - dic.decode(f)).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
    assert abs(ev["fvu"] - float(fvu)) < 1e-6
    assert ev["fvu"] < 0.4 * pca_fvu(X[12000:], X[:12000], 4)           # 4 sparse features beat 4 dense directions
    assert ev["l0"] <= 4 and history[-1]["fvu"] < history[0]["fvu"]
    rows = dic.W_dec[:, 0] / dic.W_dec[:, 0].norm(dim=1, keepdim=True)
    assert (true @ rows.T).max(dim=1).values.mean() > 0.9               # each true feature has a decoder row


def test_crosscoder_trainer_fits_two_layers():
    X, _ = planted(14000, seed=1)
    Y = 2.0 * X[:, torch.randperm(X.shape[1], generator=torch.Generator().manual_seed(2))]   # a second "layer"
    XY = torch.stack([X, Y], dim=1)
    dic, _ = train_topk(XY[:12000], [Site(0), Site(1)], width=96, k=4, steps=400, batch_size=256, progress=False)
    ev = evaluate(dic, XY[12000:])
    assert dic.n_layers == 2 and max(ev["fvu_per_layer"]) < 0.4 * pca_fvu(X[12000:], X[:12000], 4)


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "crabsweep.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_dictionary_train_command_writes_a_saelens_folder(tmp_path, capsys):
    out = tmp_path / "sae"
    args = ["dictionary", "train", *TINY, "dictionary.train.layers=[-1]", "dictionary.train.width=64",
            "dictionary.train.k=4", "dictionary.train.steps=60", "dictionary.train.batch_size=128",
            "dictionary.train.corpus.prompts=null", "dictionary.train.ce_tokens=300", f"dictionary.train.out={out}"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "held-out FVU" in proc.stdout and "CE recovered" in proc.stdout
    cfg = json.loads((out / "cfg.json").read_text())                      # SAELens v6 schema
    t = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["metadata"]["hook_name"] == "model.layers.1"
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6 and not cfg["rescale_acts_by_decoder_norm"]
    assert t["W_enc"].shape == (32, 64) and t["W_dec"].shape == (64, 32) and set(t) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    x = torch.randn(10, 32)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    vals, idx = pre.topk(4, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    torch.testing.assert_close(load_dictionary(out).encode(x[:, None]), f, atol=1e-5, rtol=1e-5)
    rec = json.loads((out / "training.json").read_text())
    assert 0 <= rec["heldout"]["fvu"] < 1 and rec["ce"][0]["hook"] == "blocks.1.hook_resid_post"
    assert load_file(str(out / "sparsity.safetensors"))["sparsity"].shape == (64,)
    assert main(["dictionary", "info", str(out)]) == 0 and "topk (k=4)" in capsys.readouterr().out
    _one_line_error(capsys, args, "exists")                              # never overwritten
    _one_line_error(capsys, ["dictionary", "bogus", *TINY], "unknown dictionary action 'bogus'")
    _one_line_error(capsys, ["dictionary", "train", *TINY, "dictionary.train.layers=[5]"], "must be distinct layers")
    _one_line_error(capsys, ["dictionary", "info", str(tmp_path)], "has no cfg.json")


def _random(name, layers, seed=0, width=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(width, len(layers), 32, generator=g)
    w = w / w.flatten(1).norm(dim=1)[:, None, None]
    return Dictionary(name, tuple(Site(x) for x in layers), 3 * w.permute(1, 2, 0).contiguous(),
                      0.1 * torch.randn(width, generator=g), w, torch.zeros(len(layers), 32), "topk", 8)


@pytest.mark.parametrize("kind, extra", [("sae", []), ("cc", ["suppression.method=many_layer", "attribution=cna"])])
def test_chain_over_dictionary_features(tmp_path, kind, extra):
    folder = save_dictionary(_random(kind, [1] if kind == "sae" else [0, 1]), tmp_path / kind)
    session = cs.load_session(*TINY, "suppression=dictionary_feature", f"suppression.path={folder}", "chain.rounds=2",
                              "k.k=3", "train.epochs=1", "chain.control=last", *extra)
    chain = cs.run_chain(session, tmp_path / "run")
    rec = chain.record
    assert rec["config"]["granularity"] == "dictionary_feature" and len(rec["rounds"]) == 3
    for r in rec["rounds"]:
        assert all(set(x["unit"]) == {"dictionary", "feature"} and x["unit"]["dictionary"] == kind
                   for x in r["recruits"]["selected"])
        assert r["metrics"]["layers_with_recruits"] == (1 if kind == "sae" else 2)
    assert rec["rounds"][2]["suppressed"] == [x["unit"] for r in rec["rounds"][:2] for x in r["recruits"]["selected"]]
    units = json.loads((tmp_path / "run" / "units.json").read_text())
    assert units["granularity"] == "dictionary_feature" and len(units["units"]) == 9
    assert (tmp_path / "run" / "chain.png").exists() and set(chain.recruits.columns) >= {"dictionary", "feature"}


def test_perturbation_suppression_trains_and_round_suppress_takes_feature_units(tmp_path):
    folder = save_dictionary(_random("sae", [1]), tmp_path / "sae")
    run = tmp_path / "run"
    proc = _run("round", *TINY, "train.epochs=1", "suppression=dictionary_feature", f"suppression.path={folder}",
                "suppression.method=perturbation", "suppression.steps=5", f"hydra.run.dir={run}",
                "round.suppress=[{dictionary: sae, feature: 7}, {dictionary: sae, feature: 9}]")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run / "round_0" / "record.json").read_text())
    assert record["suppressed"] == [{"dictionary": "sae", "feature": 7}, {"dictionary": "sae", "feature": 9}]
    assert "sae:" in proc.stdout


def test_compare_command_runs_every_method_and_plots(tmp_path):
    folder = save_dictionary(_random("cc", [0, 1], seed=3), tmp_path / "cc")
    run = tmp_path / "cmp"
    proc = _run("dictionary", "compare", *TINY, "suppression=dictionary_feature", f"suppression.path={folder}",
                f"hydra.run.dir={run}", "dictionary.compare.max_new_tokens=3", "dictionary.compare.scales=[1,4]",
                "dictionary.compare.lrs=[1.0]", "dictionary.compare.steps=3", "dictionary.compare.propagate=false",
                "dictionary.compare.prompts=[Hello there, Count to three]",
                "dictionary.compare.clean_prompts=[Hello, Count]")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((run / "compare.json").read_text())
    methods = [r["method"] for r in rec["rows"]]
    assert methods == ["none"] + ["single_layer"] * 4 + ["many_layer"] * 2 + ["perturbation"]
    none = rec["rows"][0]
    assert none["residual"] == pytest.approx(1.0) and all(r["ce"] is not None and r["ce"] > 0 for r in rec["rows"])
    assert all(r["residual"] is not None for r in rec["rows"]) and (run / "compare.png").stat().st_size > 10000
    assert "perturbation" in proc.stdout and (run / ".hydra" / "config.yaml").exists()
