"""The CLI as users run it: `crabsweep round` end to end, and one-line exit-2 user errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import transformers

from crabsweep.cli import main

TINY = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "train.epochs=1"]


def test_round_command_end_to_end(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "crabsweep.cli", "round", *TINY, f"hydra.run.dir={run}",
                           "round.suppress=[{layer: 0, index: 5}]"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top recruits" in proc.stdout and "grad_x_act" in proc.stdout and "loss: init" in proc.stdout
    assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
    record = json.loads((run / "round_0" / "record.json").read_text())
    assert record["suppressed"] == [{"layer": 0, "index": 5}]
    assert set(record["recruits"]) >= {"lora_a_grad", "grad_norm", "grad_x_act"}
    assert (run / "round_0" / "adapter" / "adapter_config.json").exists()
    assert (run / "round_0" / "scores.safetensors").exists()


def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    problems = [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert "Traceback" not in err and len(problems) == 1, err
    assert match in err, err
    return err


def _task(tmp_path, content):
    d = tmp_path / "task"
    d.mkdir()
    (d / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return d


@pytest.mark.parametrize("content, match", [
    ('{"input": "a",', "malformed JSON"),
    ({"input": "a"}, "missing or empty 'output'"),
    ({"input": "a", "output": "b", "weights": {"glue": ["nope"]}}, "glue string 'nope' does not occur"),
])
def test_bad_task_files_exit_2_with_one_line(tmp_path, capsys, content, match):
    d = _task(tmp_path, content)
    run = tmp_path / "run"
    err = _one_line_error(capsys, ["round", *TINY, f"task.path={d}", f"hydra.run.dir={run}"], match)
    assert "bad.json" in err
    assert not run.exists()          # nothing half-written left behind


def test_missing_model_and_unsupported_architecture_exit_2(tmp_path, capsys):
    _one_line_error(capsys, ["round", "model=hf", f"model.path={tmp_path / 'missing'}", "task=tiny",
                             f"hydra.run.dir={tmp_path / 'r1'}"], "does not exist; pass model.path")
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    from crabsweep.core.models import byte_tokenizer
    byte_tokenizer().save_pretrained(gpt2)
    _one_line_error(capsys, ["round", "model=hf", f"model.path={gpt2}", "task=tiny", f"hydra.run.dir={tmp_path / 'r2'}"],
                    "unsupported architecture 'gpt2'")


@pytest.mark.parametrize("override, match", [
    ("model=nonexistent", "Could not find 'model/nonexistent'"),
    ("train.nonsense=1", "use +train.nonsense=1"),
    ("train.epochs=0", "train.epochs=0: Input should be greater than or equal to 1"),
    ("round.suppress=[{layer: 9, index: 0}]", "out of range"),
])
def test_bad_config_exit_2(tmp_path, capsys, override, match):
    _one_line_error(capsys, ["round", *TINY, override, f"hydra.run.dir={tmp_path / 'r'}"], match)


def test_unknown_command_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
