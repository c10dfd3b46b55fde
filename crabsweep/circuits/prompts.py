"""Prompt sets: the prompts, targets and contrast sets the circuit commands share.

A prompt set is a JSON file (shipped ones: `crabsweep/data/circuits/<name>.json`, e.g. `capitals`):

    {"chat": false,                                      # raw text (default) or the chat template
     "prompts":  [{"prompt": "The capital of France is", "target": " Paris", "counterfactual": " Lyon"}, …],
     "heldout":  [{"prompt": "The capital of Italy is", "target": " Rome"}, …],   # evaluated, never discovered on
     "control":  [{"prompt": "The plural of mouse is", "target": " mice"}, …],   # unrelated facts
     "positive": ["…"], "negative": ["…"],               # contrastive discovery / CAA
     "patch":    ["…"]}                                  # faithfulness: prompts the means come from

Every key is optional. A target is scored by its FIRST sub-token (the token the model must predict
next; the reference used the last one). `circuit.prompts=task` takes the session task's prompts (chat
template, scored by the task's scorer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ROOT
from ..core.observers import prompt_examples
from ..core.unitsets import read_json_file
from ..errors import UserError

log = logging.getLogger(__name__)
DATA = ROOT / "data" / "circuits"


@dataclass(frozen=True)
class Item:
    prompt: str
    target: str | None = None
    counterfactual: str | None = None


@dataclass
class PromptSet:
    name: str
    items: list[Item] = field(default_factory=list)
    heldout: list[Item] = field(default_factory=list)
    control: list[Item] = field(default_factory=list)
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    patch: list[str] = field(default_factory=list)
    chat: bool = False
    scorer: object = None              # text → score; None: "the generation starts with the target"


def resolve(spec: str) -> Path:
    """A prompt-set name (data/circuits/<name>.json) or a path."""
    shipped = DATA / f"{spec}.json"
    if "/" not in spec and not spec.endswith(".json") and shipped.is_file():
        return shipped
    path = Path(spec).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DATA.glob("*.json")))
        raise UserError(f"prompt set '{spec}' is neither a shipped set ({names}) nor a file; fix circuit.prompts")
    return path


def _items(raw, where: str) -> list[Item]:
    if not isinstance(raw, list):
        raise UserError(f"{where} must be a list of {{\"prompt\": str, \"target\": str}} objects")
    out = []
    for i, x in enumerate(raw):
        x = {"prompt": x} if isinstance(x, str) else x
        if not isinstance(x, dict) or not isinstance(x.get("prompt"), str) or not x["prompt"]:
            raise UserError(f"{where}[{i}] needs a non-empty 'prompt' string")
        extra = set(x) - {"prompt", "target", "counterfactual"}
        if extra:
            raise UserError(f"{where}[{i}] has unknown keys {sorted(extra)}; use prompt, target, counterfactual")
        for k in ("target", "counterfactual"):
            if x.get(k) is not None and (not isinstance(x[k], str) or not x[k]):
                raise UserError(f"{where}[{i}].{k} must be a non-empty string")
        out.append(Item(x["prompt"], x.get("target"), x.get("counterfactual")))
    return out


def _strings(raw, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(s, str) and s for s in raw):
        raise UserError(f"{where} must be a list of non-empty strings")
    return list(raw)


def load_prompt_set(spec: str, chat: bool | None = None, session=None) -> PromptSet:
    """The prompt set `spec` (a shipped name, a JSON file, or "task"); `chat` overrides its own choice."""
    if spec == "task":
        if session is None:
            raise UserError("circuit.prompts=task needs a loaded session")
        examples = session.task.heldout or session.task.train
        return PromptSet("task", [Item(e.sample.input) for e in examples], chat=True if chat is None else chat,
                         scorer=session.task.scorer)
    path = resolve(spec)
    data = read_json_file(path, "prompt set")
    if not isinstance(data, dict):
        raise UserError(f"{path}: a prompt set is a JSON object with 'prompts', 'control', 'positive', …")
    unknown = set(data) - {"description", "chat", "prompts", "heldout", "control", "positive", "negative",
                       "patch"}
    if unknown:
        raise UserError(f"{path}: unknown keys {sorted(unknown)}; a prompt set has description, chat, prompts, "
                        "control, positive, negative, patch")
    own = data.get("chat", False)
    if not isinstance(own, bool):
        raise UserError(f"{path}: 'chat' must be true or false")
    return PromptSet(path.stem, _items(data.get("prompts", []), f"{path}: prompts"),
                     _items(data.get("heldout", []), f"{path}: heldout"),
                     _items(data.get("control", []), f"{path}: control"),
                     _strings(data.get("positive", []), f"{path}: positive"),
                     _strings(data.get("negative", []), f"{path}: negative"),
                     _strings(data.get("patch", []), f"{path}: patch"), own if chat is None else chat)


def prompt_list(spec, what: str) -> list[str]:
    """A list of prompts given inline, as a JSON list file, or as a text file (one prompt per line)."""
    if isinstance(spec, list):
        return _strings(spec, what)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{what} '{spec}' is not a file; pass a list of prompts or a .json/.txt file")
    if path.suffix == ".json":
        data = read_json_file(path, what)
        return _strings(data.get("prompts", data) if isinstance(data, dict) else data, f"{path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from e
    return _strings([line for line in lines if line], str(path))


def encode(session, prompts: list[str], chat: bool) -> list[torch.Tensor]:
    """Token ids of each prompt: the chat template with a generation prompt, or raw text with BOS."""
    return [e.input_ids for e in prompt_examples(session, prompts, chat=chat)]


def token_id(tokenizer, text: str, what: str = "target") -> int:
    """The first sub-token of `text` (what the model predicts next); warns when `text` has several."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise UserError(f"{what} {text!r} encodes to no token; give a non-empty string")
    if len(ids) > 1:
        log.warning("%s %r is %d tokens; scoring its first, %r", what, text, len(ids), tokenizer.decode(ids[:1]))
    return int(ids[0])

