"""Hydra's own flags on every command: --help, --cfg, --info, --config-dir, +experiment, -m, completion."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from crabsweep.cli import main
from crabsweep.io import read_json

TINY = ["model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=2", "train.epochs=1", "chain.rounds=1"]


def _cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "crabsweep.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cfg_job_prints_the_composed_config_and_writes_nothing(tmp_path):
    proc = _cli("chain", "--cfg", "job", "model=tiny_llama", "k.k=7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "tiny_llama" and cfg["k"]["k"] == 7 and cfg["command"] == "chain"
    assert "hydra" not in cfg
    assert list(tmp_path.iterdir()) == []                                 # no run folder, nothing written
    proc = _cli("chain", "--cfg", "all", "--resolve", "--package", "train", cwd=tmp_path)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["epochs"] == 2
    proc = _cli("chain", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0 and "run:" in proc.stdout and list(tmp_path.iterdir()) == []


def test_help_lists_commands_and_groups_and_errors_are_one_line(tmp_path, capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "chain" in out and "sweep" in out and "adapter" in out and "prompt_tuning" in out
    assert main(["chain", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--cfg job" in out and "attribution" in out and "integrated_gradients" in out
    assert main(["chain", "--cfg", "bogus"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "invalid choice" in err


def test_info_config_dir_and_experiment_presets(tmp_path):
    mine = tmp_path / "myconf"
    (mine / "model").mkdir(parents=True)
    (mine / "experiment").mkdir()
    (mine / "model" / "mine.yaml").write_text(
        "name: mine\nsource: tiny\nconfig_class: LlamaConfig\nmodel_class: LlamaForCausalLM\nseed: 3\n"
        "config: {hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, num_attention_heads: 4,"
        " num_key_value_heads: 2, max_position_embeddings: 1024}\n")
    (mine / "experiment" / "quick.yaml").write_text("# @package _global_\ntrain:\n  epochs: 1\nk:\n  k: 2\n")
    proc = _cli("chain", "--info", "searchpath", "--config-dir", str(mine), cwd=tmp_path)
    assert proc.returncode == 0 and f"file://{mine}" in proc.stdout
    run = tmp_path / "run"
    proc = _cli("chain", "--config-dir", str(mine), "model=mine", "+experiment=quick", *TINY[1:4],
                f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    chain = read_json(run / "chain.json")
    assert chain["fingerprints"]["model"]["name"] == "mine" and len(chain["rounds"][0]["recruits"]["selected"]) == 2
    assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["train"]["epochs"] == 1
    proc = _cli("chain", "+experiment=reference", "--cfg", "job", cwd=tmp_path)       # the shipped preset
    assert yaml.safe_load(proc.stdout)["train"]["lr"] == 1e-4


def test_multirun_runs_the_cross_product_in_one_process(tmp_path):
    sweep = tmp_path / "m"
    proc = _cli("chain", "-m", *TINY, "k.k=2,3", "attribution=grad_norm,grad_x_act", f"hydra.sweep.dir={sweep}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    jobs = sorted(p.name for p in sweep.iterdir())
    assert jobs == ["0", "1", "2", "3"]
    seen = {(c["config"]["attribution"], c["config"]["k"]["k"]) for c in (read_json(sweep / j / "chain.json") for j in jobs)}
    assert seen == {("grad_norm", 2), ("grad_norm", 3), ("grad_x_act", 2), ("grad_x_act", 3)}
    assert proc.stderr.count("loaded tiny_llama") == 1                          # the model is loaded once


def test_shell_completion(tmp_path):
    proc = _cli("-sc", "install=bash", cwd=tmp_path)
    assert proc.returncode == 0 and "complete" in proc.stdout and "crabsweep" in proc.stdout
    proc = _cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "crabsweep ch"})
    assert proc.stdout.split() == ["chain"]
    proc = _cli("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "crabsweep chain adapter="})
    assert set(proc.stdout.split()) == {"adapter=full", "adapter=lora", "adapter=prompt_tuning"}
