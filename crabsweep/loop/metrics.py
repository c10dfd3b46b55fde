"""Measurements of a model state: losses on a set of examples, greedy generations, task scores."""

from __future__ import annotations

import torch

import json
from pathlib import Path

from ..errors import UserError
from ..core.tasks import Example, Sample, Scorer, collate
from .train import token_losses


@torch.no_grad()
def eval_loss(model, examples: list[Example], pad_id: int, device, batch_size: int = 4) -> dict:
    """Token-mean plain loss, weighted loss and per-sample plain losses over `examples`."""
    if not examples:
        return {"plain": None, "weighted": None, "per_sample": {}}
    was_training = model.training
    model.eval()
    ce_sum = w_sum = tok = wtok = 0.0
    per_sample = {}
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, pad_id)
        weighted, plain, per_row = token_losses(model, batch, device)
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
def generate(model, tokenizer, examples: list[Example], device, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each example's prompt, one at a time (exact, no padding effects)."""
    was_training = model.training
    model.eval()
    texts = []
    for e in examples:
        ids = e.prompt_ids.unsqueeze(0).to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return texts


def score_generations(examples: list[Example], texts: list[str], scorer: Scorer, **extra) -> list[dict]:
    return [{"id": e.sample.id, "prompt": e.sample.input, "text": t, "score": scorer(t), **extra}
            for e, t in zip(examples, texts)]


def text_examples(path: str | Path, tokenizer) -> list[Example]:
    """A generic text set (`{"texts": [...]}`) as plain LM examples: every token but the first is a label."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"generic text set '{path}' does not exist; set eval.collateral_path to a JSON file")
    out = []
    for i, text in enumerate(json.loads(path.read_text())["texts"]):
        ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"], dtype=torch.long)
        labels = ids.clone()
        labels[0] = -100
        out.append(Example(Sample(f"generic:{i}", "", text, str(path)), ids, labels, torch.ones(len(ids)), ids[:0]))
    return out


@torch.no_grad()
def base_loss(session, examples: list[Example], suppressed) -> float:
    """Plain loss of the base model (adapter disabled) under the mask `suppressed`."""
    cfg = session.cfg
    session.apply_suppression(suppressed)
    with session.model.disable_adapter():
        return eval_loss(session.model, examples, session.pad_id, session.device, int(cfg.eval.batch_size))["plain"]
