"""Task files → tokenized examples (prompt-masked labels, per-token weights, train / held-out).

A task is a file or a folder of JSON files. A file holds one sample object, a list of them, or
`{"samples": [...]}`. A sample has `input` and `output`, optionally `id`, `split` ("train" or
"heldout"), `weights: {"conclusion": [...], "glue": [...]}` — substrings of `output` whose tokens
get weight 2.0 / 0.1 (other assistant tokens 0.5), as in the reference. Every problem is a UserError
naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import UserError
from ..registry import Registry

log = logging.getLogger(__name__)

WEIGHT_CONCLUSION, WEIGHT_GLUE, WEIGHT_OTHER = 2.0, 0.1, 0.5


@dataclass
class Sample:
    id: str
    input: str
    output: str
    source: str
    split: str = "train"
    conclusion: list[str] = field(default_factory=list)
    glue: list[str] = field(default_factory=list)
    behaviour: list[str] = field(default_factory=list)   # substrings that carry the behaviour (else the scorer's)


@dataclass
class Example:
    sample: Sample
    input_ids: torch.Tensor      # [T] prompt + target
    labels: torch.Tensor         # [T] -100 on the prompt
    weights: torch.Tensor        # [T] per-token loss weight (0 on the prompt)
    prompt_ids: torch.Tensor     # [P] what generation starts from
    behaviour: torch.Tensor | None = None   # [T] bool: answer tokens that carry the behaviour (headers, keys)


@dataclass
class Task:
    name: str
    train: list[Example]
    heldout: list[Example]
    scorer: "Scorer"
    files: dict[str, str]        # file name → sha256, for fingerprints


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------
def task_files(path: str | Path) -> list[Path]:
    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if files:
            return files
        raise UserError(f"task folder '{path}' holds no .json files; point task.path at a folder of samples")
    raise UserError(f"task path '{path}' does not exist; pass task=<name> or task.path=<file or folder>")


def load_samples(path: str | Path) -> list[Sample]:
    samples: list[Sample] = []
    for f in task_files(path):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{f}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from e
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file") from e
        items = data.get("samples", data) if isinstance(data, dict) else data
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list):
            raise UserError(f"{f}: expected a sample object, a list of them or {{\"samples\": [...]}}")
        for i, item in enumerate(items):
            samples.append(_parse_sample(item, f, default_id=f.stem if len(items) == 1 else f"{f.stem}:{i}"))
    ids = [s.id for s in samples]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"duplicate sample ids {dupes} in {path}; give each sample a unique 'id'")
    return samples


def _parse_sample(item, f: Path, default_id: str) -> Sample:
    where = f"{f} (sample '{item.get('id', default_id)}')" if isinstance(item, dict) else str(f)
    if not isinstance(item, dict):
        raise UserError(f"{where}: a sample must be a JSON object with 'input' and 'output'")
    for key in ("input", "output"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise UserError(f"{where}: missing or empty '{key}'; every sample needs 'input' and 'output' strings")
    split = item.get("split", "train")
    if split not in ("train", "heldout"):
        raise UserError(f"{where}: split '{split}' must be 'train' or 'heldout'")
    weights = item.get("weights") or {}
    if not isinstance(weights, dict) or set(weights) - {"conclusion", "glue", "behaviour"}:
        raise UserError(f"{where}: 'weights' takes only 'conclusion', 'glue' and 'behaviour' lists of substrings")
    for kind, strings in weights.items():
        if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
            raise UserError(f"{where}: weights.{kind} must be a list of non-empty strings (substrings of 'output')")
        for s in strings:
            if s not in item["output"]:
                raise UserError(f"{where}: {kind} string {s!r} does not occur in 'output'; "
                                "copy it verbatim from the output or remove it")
    return Sample(id=str(item.get("id", default_id)), input=item["input"], output=item["output"], source=str(f),
                  split=split, conclusion=list(weights.get("conclusion", [])), glue=list(weights.get("glue", [])),
                  behaviour=list(weights.get("behaviour", [])))


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------
def render(tokenizer, prompt: str, answer: str | None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if answer is None:
        if tokenizer.chat_template:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n"
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    return prompt + "\n" + answer + (tokenizer.eos_token or "")


def _overlapping(offsets, first: int, spans) -> torch.Tensor:
    """Tokens (from `first` on) whose character span overlaps any of `spans`."""
    hit = torch.zeros(len(offsets), dtype=torch.bool)
    for a, b in spans:
        for t in range(first, len(offsets)):
            if offsets[t][0] < b and offsets[t][1] > a:
                hit[t] = True
    return hit


def _substring_spans(text: str, start: int, strings) -> list[tuple[int, int]]:
    return [(start + text.find(s), start + text.find(s) + len(s)) for s in strings if s in text]


def tokenize_sample(sample: Sample, tokenizer, max_prompt_tokens: int, weighted: bool, scorer=None) -> Example:
    """Chat-format a sample; labels only on the assistant part; per-token weights from annotations;
    behaviour tokens from the sample's `behaviour` annotation or the scorer's `spans`."""
    prompt_text = render(tokenizer, sample.input, None)
    full_text = render(tokenizer, sample.input, sample.output)
    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    full_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not full_text.startswith(prompt_text) or full_ids[:len(prompt_ids)] != prompt_ids:
        raise UserError(f"{sample.source} (sample '{sample.id}'): the prompt's tokens are not a prefix of the "
                        "conversation's tokens under this chat template; use a model whose template "
                        "renders the user turn identically with and without the answer")
    n_prompt = len(prompt_ids)
    out = sample.output if sample.output in full_text[len(prompt_text):] else sample.output.strip()
    out_start = full_text.find(out, len(prompt_text))
    annotated = weighted and (sample.conclusion or sample.glue)
    if out_start < 0 and (annotated or sample.behaviour):
        raise UserError(f"{sample.source} (sample '{sample.id}'): the chat template alters the output text, "
                        "so annotations cannot be placed; set train.weighted=false and drop 'behaviour'")
    weights = torch.zeros(len(full_ids))
    weights[n_prompt:] = WEIGHT_OTHER if annotated else 1.0
    if annotated:
        for strings, w in ((sample.glue, WEIGHT_GLUE), (sample.conclusion, WEIGHT_CONCLUSION)):
            for span in _substring_spans(out, out_start, strings):
                weights[_overlapping(offsets, n_prompt, [span])] = w
    behaviour = torch.zeros(len(full_ids), dtype=torch.bool)
    if out_start >= 0:
        spans = (_substring_spans(out, out_start, sample.behaviour) if sample.behaviour else
                 [(out_start + a, out_start + b) for a, b in getattr(scorer, "spans", lambda _t: [])(out)])
        behaviour = _overlapping(offsets, n_prompt, spans)
    ids = torch.tensor(full_ids, dtype=torch.long)
    labels = ids.clone()
    labels[:n_prompt] = -100
    if n_prompt > max_prompt_tokens:
        ids, labels, weights, behaviour, n_prompt = _truncate(sample, prompt_text, offsets, ids, labels, weights,
                                                               behaviour, n_prompt, max_prompt_tokens)
    return Example(sample, ids, labels, weights, ids[:n_prompt].clone(), behaviour)


def _truncate(sample, prompt_text, offsets, ids, labels, weights, behaviour, n_prompt, limit):
    """Left truncation inside the user's content: the chat template's head (system turn, role header) and
    the prompt's tail are kept; the oldest content tokens are dropped."""
    content_start = prompt_text.find(sample.input)
    content_end = content_start + len(sample.input)
    head = sum(1 for t in range(n_prompt) if offsets[t][1] <= max(content_start, 0))
    tail = sum(1 for t in range(n_prompt) if offsets[t][0] >= content_end)
    cut = n_prompt - limit
    if content_start < 0 or head + tail >= limit:
        raise UserError(f"sample '{sample.id}': task.max_prompt_tokens={limit} leaves no room for the prompt next to "
                        f"the chat template's own {head + tail} tokens; raise task.max_prompt_tokens")
    log.warning("sample '%s': prompt has %d tokens, dropping %d content tokens after the template's head "
                "(task.max_prompt_tokens=%d)", sample.id, n_prompt, cut, limit)
    keep = torch.cat([torch.arange(head), torch.arange(head + cut, len(ids))])
    return ids[keep], labels[keep], weights[keep], behaviour[keep], limit


def read_task(tcfg) -> list[Sample]:
    """Read and validate the task's samples and split (no tokenizer needed: fails fast)."""
    samples = load_samples(tcfg.path)
    heldout_ids = set(tcfg.get("heldout") or [])
    unknown = heldout_ids - {s.id for s in samples}
    if unknown:
        raise UserError(f"task.heldout names unknown sample ids {sorted(unknown)}; ids are "
                        f"{[s.id for s in samples]}")
    for s in samples:
        if s.id in heldout_ids:
            s.split = "heldout"
    if not any(s.split == "train" for s in samples):
        raise UserError(f"task '{tcfg.name}' has no training samples; mark fewer samples as held-out")
    return samples


def load_task(tcfg, tokenizer, weighted: bool = True, samples: list[Sample] | None = None) -> Task:
    """Build the task named by the `task` config group: samples, split, tokenization and scorer."""
    samples = read_task(tcfg) if samples is None else samples
    scorer = make_scorer(tcfg.scorer)
    examples = [tokenize_sample(s, tokenizer, int(tcfg.max_prompt_tokens), weighted, scorer) for s in samples]
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in task_files(tcfg.path)}
    return Task(tcfg.name, [e for e in examples if e.sample.split == "train"],
                [e for e in examples if e.sample.split == "heldout"], scorer, files)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padded positions have label -100 and weight 0."""
    n = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": torch.full((len(examples), n), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), n), dtype=torch.long),
             "labels": torch.full((len(examples), n), -100, dtype=torch.long),
             "weights": torch.zeros((len(examples), n)),
             "behaviour": torch.zeros((len(examples), n), dtype=torch.bool)}
    for i, e in enumerate(examples):
        t = len(e.input_ids)
        batch["input_ids"][i, :t] = e.input_ids
        batch["attention_mask"][i, :t] = 1
        batch["labels"][i, :t] = e.labels
        batch["weights"][i, :t] = e.weights
        if e.behaviour is not None:
            batch["behaviour"][i, :t] = e.behaviour
    return batch


# --------------------------------------------------------------------------------------------------
# Scorers: how well a generation shows the task's behaviour, in [0, 1]
# --------------------------------------------------------------------------------------------------
class Scorer(Protocol):
    def __call__(self, text: str) -> float: ...


class SectionsScorer:
    """Fraction of the required section headers that start a line of the generation."""

    def __init__(self, headers):
        self.patterns = [re.compile(rf"(?im)^[\s#*_>-]*({re.escape(h)}\s*[*_]*\s*:)") for h in headers]

    def __call__(self, text: str) -> float:
        return sum(bool(p.search(text)) for p in self.patterns) / len(self.patterns)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The behaviour's own characters: every header with its colon."""
        return [m.span(1) for p in self.patterns for m in p.finditer(text)]


class JsonFieldsScorer:
    """Fraction of required keys in the first JSON object of the generation (0 if none parses)."""

    def __init__(self, keys):
        self.keys = list(keys)

    def __call__(self, text: str) -> float:
        start = text.find("{")
        if start < 0:
            return 0.0
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            return 0.0
        if not isinstance(obj, dict):
            return 0.0
        return sum(k in obj for k in self.keys) / len(self.keys)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """The behaviour's own characters: the JSON braces and every required key with its colon."""
        out = [m.span() for k in self.keys for m in re.finditer(rf'"{re.escape(k)}"\s*:', text)]
        return out + [m.span() for m in re.finditer(r"[{}]", text)]


class _ScorerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SectionsConfig(_ScorerConfig):
    name: Literal["sections"]
    headers: list[str] = Field(min_length=1)


class JsonFieldsConfig(_ScorerConfig):
    name: Literal["json_fields"]
    keys: list[str] = Field(min_length=1)


SCORERS = Registry("task scorer", key="task.scorer.name")
SCORERS.register("sections", config=SectionsConfig)(lambda c: SectionsScorer(c["headers"]))
SCORERS.register("json_fields", config=JsonFieldsConfig)(lambda c: JsonFieldsScorer(c["keys"]))


class TaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    heldout: list[str] = []
    learned_at: float | None = Field(None, ge=0, le=1)
    max_prompt_tokens: int = Field(ge=1)
    scorer: dict

    @field_validator("scorer")
    @classmethod
    def _scorer(cls, v):
        entry = SCORERS.get(v.get("name", "?"))
        entry.config.model_validate(v)
        return v


def make_scorer(scfg) -> Scorer:
    return SCORERS.get(scfg.name).obj(scfg)
