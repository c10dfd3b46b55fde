"""Task loading: validation errors, chat-template masking, per-token weights, split, scorers."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from crabsweep.errors import UserError
from crabsweep.core.models import byte_tokenizer
from crabsweep.core.tasks import (WEIGHT_CONCLUSION, WEIGHT_GLUE, WEIGHT_OTHER, JsonFieldsScorer, SectionsScorer, load_samples,
                             load_task, tokenize_sample)


def _write(tmp_path, obj, name="s.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_labels_only_on_assistant_tokens_and_weights_from_annotations(tmp_path):
    tok = byte_tokenizer()
    _write(tmp_path, {"input": "Rate it.", "output": "Verdict: fine. Done.",
                      "weights": {"conclusion": ["fine"], "glue": ["Done"]}})
    ex = tokenize_sample(load_samples(tmp_path)[0], tok, max_prompt_tokens=512, weighted=True)
    n_prompt = len(ex.prompt_ids)
    assert torch.all(ex.labels[:n_prompt] == -100) and torch.all(ex.weights[:n_prompt] == 0)
    assert tok.decode(ex.labels[n_prompt:]) == "Verdict: fine. Done.<|im_end|>\n"
    def tokens_weighted(w):
        return tok.decode([int(t) for t, x in zip(ex.input_ids, ex.weights) if abs(float(x) - w) < 1e-6])
    assert tokens_weighted(WEIGHT_CONCLUSION) == "fine" and tokens_weighted(WEIGHT_GLUE) == "Done"
    assert float(ex.weights[n_prompt]) == WEIGHT_OTHER
    plain = tokenize_sample(load_samples(tmp_path)[0], tok, 512, weighted=False)
    assert torch.all(plain.weights[n_prompt:] == 1.0)


def test_prompt_must_be_a_token_prefix_of_the_conversation(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = ("{% if messages|length > 1 %}SYS-A {% else %}SYS-B {% endif %}"
                         "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    _write(tmp_path, {"input": "Q", "output": "A"})
    with pytest.raises(UserError, match="not a prefix"):
        tokenize_sample(load_samples(tmp_path)[0], tok, 512, weighted=False)


def test_left_truncation_keeps_the_chat_template_and_the_tokens_nearest_the_answer(tmp_path):
    tok = byte_tokenizer()
    _write(tmp_path, {"input": "x" * 100 + "END", "output": "ok"})
    ex = tokenize_sample(load_samples(tmp_path)[0], tok, max_prompt_tokens=40, weighted=False)
    text = tok.decode(ex.prompt_ids)
    assert len(ex.prompt_ids) == 40 and text.startswith("<|im_start|>user\nxxx")      # the template's head is kept
    assert text.endswith("xEND<|im_end|>\n<|im_start|>assistant\n") and text.count("x") < 100
    assert tok.decode(ex.labels[40:]) == "ok<|im_end|>\n"
    with pytest.raises(UserError, match="leaves no room"):
        tokenize_sample(load_samples(tmp_path)[0], tok, max_prompt_tokens=19, weighted=False)


def test_behaviour_tokens_come_from_the_scorer_or_an_annotation(tmp_path):
    from crabsweep.core.tasks import JsonFieldsScorer, SectionsScorer
    tok = byte_tokenizer()
    out = "Strengths: vivid.\nWeaknesses: thin.\n**Verdict:** good. Strengths: again"
    _write(tmp_path, {"input": "q", "output": out})
    ex = tokenize_sample(load_samples(tmp_path)[0], tok, 512, weighted=False,
                         scorer=SectionsScorer(["Strengths", "Weaknesses", "Verdict"]))
    marked = tok.decode(ex.input_ids[ex.behaviour])
    assert marked == "Strengths:Weaknesses:Verdict:"        # line-start headers only, markup excluded
    assert not ex.behaviour[ex.labels == -100].any()
    js = '{"name": "Ada", "city": "Oslo"}'
    _write(tmp_path, {"input": "q", "output": js})
    ex = tokenize_sample(load_samples(tmp_path)[0], tok, 512, weighted=False, scorer=JsonFieldsScorer(["name", "city"]))
    assert tok.decode(ex.input_ids[ex.behaviour]) == '{"name":"city":}'
    _write(tmp_path, {"input": "q", "output": "abc def", "weights": {"behaviour": ["def"]}})
    ex = tokenize_sample(load_samples(tmp_path)[0], tok, 512, weighted=False, scorer=SectionsScorer(["X"]))
    assert tok.decode(ex.input_ids[ex.behaviour]) == "def"


@pytest.mark.parametrize("content, match", [
    ('{"input": "a", "output": ', "malformed JSON at line 1"),
    ({"input": "a"}, "missing or empty 'output'"),
    ({"input": "a", "output": "b", "weights": {"conclusion": ["zzz"]}}, "conclusion string 'zzz' does not occur"),
    ({"input": "a", "output": "b", "split": "test"}, "split 'test'"),
    ([{"id": "x", "input": "a", "output": "b"}, {"id": "x", "input": "c", "output": "d"}], "duplicate sample ids"),
])
def test_malformed_task_files_name_the_file_and_problem(tmp_path, content, match):
    path = _write(tmp_path, content, "broken.json")
    with pytest.raises(UserError, match=match) as e:
        load_samples(tmp_path)
    assert str(path) in str(e.value) or "duplicate" in match


def test_split_by_field_and_by_config_list(tmp_path):
    _write(tmp_path, [{"id": "a", "input": "1", "output": "x"}, {"id": "b", "input": "2", "output": "y"},
                      {"id": "c", "input": "3", "output": "z", "split": "heldout"}])
    tcfg = OmegaConf.create({"name": "t", "path": str(tmp_path), "heldout": ["b"], "max_prompt_tokens": 64,
                             "scorer": {"name": "sections", "headers": ["V"]}})
    task = load_task(tcfg, byte_tokenizer())
    assert [e.sample.id for e in task.train] == ["a"] and [e.sample.id for e in task.heldout] == ["b", "c"]
    tcfg.heldout = ["nope"]
    with pytest.raises(UserError, match="unknown sample ids"):
        load_task(tcfg, byte_tokenizer())


def test_shipped_tasks_load_with_their_sizes():
    from crabsweep.config import ROOT
    crit = load_samples(ROOT / "data" / "critique")
    assert sum(s.split == "train" for s in crit) >= 6 and sum(s.split == "heldout" for s in crit) >= 2
    scorer = SectionsScorer(["Strengths", "Weaknesses", "Structure", "Verdict"])
    assert all(scorer(s.output) == 1.0 for s in crit)
    js = load_samples(ROOT / "data" / "json_extract")
    assert all(JsonFieldsScorer(["name", "city", "year", "item"])(s.output) == 1.0 for s in js)


def test_scorers():
    s = SectionsScorer(["Strengths", "Verdict"])
    assert s("**Strengths:** good\nVerdict: ok") == 1.0 and s("Strengths: good") == 0.5 and s("no headers") == 0.0
    j = JsonFieldsScorer(["name", "city"])
    assert j('Sure: {"name": "A", "city": "B"}') == 1.0 and j('{"name": 1}') == 0.5
    assert j("{broken") == 0.0 and j("[1, 2]") == 0.0
