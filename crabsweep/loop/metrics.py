"""Measurements of a model state: losses on a set of examples, greedy generations, task scores."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    for i in range(0, len(examples), batch_size):
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
def generate_ids(session, examples: list[Example], max_new_tokens: int) -> list[torch.Tensor]:
    """Greedy continuation (new token ids, CPU) of each example's prompt, one at a time (exact, no padding)."""
    model, tok = session.model, session.tokenizer
    was_training = model.training
    model.eval()
    outs = []
    for e in examples:
        ids = e.prompt_ids.unsqueeze(0).to(session.device)
        with session.precision():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        outs.append(out[0, ids.shape[1]:].cpu())
    model.train(was_training)
    return outs


def generate(session, examples: list[Example], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each example's prompt, one at a time (exact, no padding effects)."""
    return [session.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_ids(session, examples, max_new_tokens)]


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
