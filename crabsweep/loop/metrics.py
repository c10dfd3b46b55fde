"""Measurements of a model state: losses on a set of examples, greedy generations, task scores."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.tasks import Example, Sample, Scorer, collate
from ..errors import UserError
from .train import token_losses


@torch.no_grad()
def eval_loss(session, examples: list[Example], batch_size: int | None = None) -> dict:
    """Token-mean plain loss, weighted loss and per-sample plain losses over `examples`."""
    if not examples:
        return {"plain": None, "weighted": None, "per_sample": {}}
    model = session.model
    batch_size = batch_size or int(session.cfg.eval.batch_size)
    was_training = model.training
    model.eval()
    ce_sum = w_sum = tok = wtok = 0.0
    per_sample = {}
    for i in tqdm(range(0, len(examples), batch_size), desc="evaluating", unit="batch", leave=False, disable=None,
                  delay=1.0):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, session.pad_id)
        with session.precision():
            weighted, plain, per_row = token_losses(model, batch, session.device)
        n = float((batch["labels"] != -100).sum())
        w = float(batch["weights"].sum())
        ce_sum += plain.item() * n
        tok += n
        w_sum += weighted.item() * w
        wtok += w
        per_sample.update({e.sample.id: float(r) for e, r in zip(chunk, per_row)})
    model.train(was_training)
    return {"plain": ce_sum / tok, "weighted": w_sum / wtok, "per_sample": per_sample}


@torch.no_grad()
def generate(session, examples: list[Example], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each example's prompt, one at a time (exact, no padding effects)."""
    model, tok = session.model, session.tokenizer
    was_training = model.training
    model.eval()
    texts = []
    bar = tqdm(total=len(examples) * max_new_tokens, desc="generating", unit="tok", leave=False, disable=None,
               delay=0.5)
    for i, e in enumerate(examples):
        ids = e.prompt_ids.unsqueeze(0).to(session.device)
        with session.precision():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, streamer=_TokenBar(bar))
        texts.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        bar.update((i + 1) * max_new_tokens - bar.n)            # an early end of text counts as done
    bar.close()
    model.train(was_training)
    return texts


class _TokenBar:
    """A `generate(streamer=...)` that advances a progress bar per new token (the first put is the prompt)."""

    def __init__(self, bar):
        self.bar, self.prompt_seen = bar, False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.bar.update(int(value.numel()))
        self.prompt_seen = True

    def end(self) -> None:
        pass


def score_generations(examples: list[Example], texts: list[str], scorer: Scorer, **extra) -> list[dict]:
    return [{"id": e.sample.id, "prompt": e.sample.input, "text": t, "score": scorer(t), **extra}
            for e, t in zip(examples, texts)]


def text_examples(path: str | Path, tokenizer) -> list[Example]:
    """A generic text set (`{"texts": [...]}`) as plain LM examples: every token but the first is a label."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"generic text set '{path}' does not exist; set eval.collateral_path to a JSON file")
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))["texts"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected UTF-8 JSON {{\"texts\": [\"...\", ...]}} ({type(e).__name__}); "
                        "fix the file or eval.collateral_path") from e
    out = []
    for i, text in enumerate(texts):
        ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=torch.long)
        labels = ids.clone()
        labels[0] = -100
        out.append(Example(Sample(f"generic:{i}", "", text, str(path)), ids, labels, torch.ones(len(ids)), ids[:0]))
    return out


@torch.no_grad()
def base_loss(session, examples: list[Example], suppressed) -> float:
    """Plain loss of the base model (adapter disabled) with `suppressed` masked."""
    with session.adapter.disabled(), session.intervene(session.mask(suppressed)):
        return eval_loss(session, examples)["plain"]
