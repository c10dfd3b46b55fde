"""Measurements of a model state: losses on a set of examples, greedy generations, task scores."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.tasks import Example, Sample, Scorer, collate
from ..errors import UserError
from .train import token_ce


@torch.no_grad()
def eval_loss(session, examples: list[Example], batch_size: int | None = None) -> dict:
    """Token-mean plain and weighted loss, per-sample plain losses, and the cross-entropy on the behaviour
    tokens (what the task's scorer or annotations mark, e.g. section headers, JSON keys) and on the rest of
    the answer (content) over `examples`."""
    if not examples:
        return {"plain": None, "weighted": None, "per_sample": {}, "behaviour": None, "content": None}
    model = session.model
    batch_size = batch_size or int(session.cfg.eval.batch_size)
    was_training = model.training
    model.eval()
    sums = {"plain": 0.0, "n": 0.0, "weighted": 0.0, "w": 0.0, "behaviour": 0.0, "nb": 0.0, "content": 0.0, "nc": 0.0}
    per_sample = {}
    for i in tqdm(range(0, len(examples), batch_size), desc="evaluating", unit="batch", leave=False, disable=None,
                  delay=1.0):
        chunk = examples[i:i + batch_size]
        batch = collate(chunk, session.pad_id)
        with session.precision():
            ce, answer = token_ce(model, batch, session.device)
        ce = ce.double().cpu()
        labelled = batch["labels"][:, answer] != -100
        behaviour = batch["behaviour"][:, answer] & labelled
        content = labelled & ~behaviour
        w = batch["weights"][:, answer].double()
        for key, n, sel in (("plain", "n", labelled), ("behaviour", "nb", behaviour), ("content", "nc", content)):
            sums[key] += float(ce[sel].sum())
            sums[n] += float(sel.sum())
        sums["weighted"] += float((ce * w).sum())
        sums["w"] += float(w.sum())
        per_sample.update({e.sample.id: float(ce[j][labelled[j]].mean()) for j, e in enumerate(chunk)})
    model.train(was_training)
    ratio = lambda a, b: sums[a] / sums[b] if sums[b] else None  # noqa: E731
    return {"plain": ratio("plain", "n"), "weighted": ratio("weighted", "w"), "per_sample": per_sample,
            "behaviour": ratio("behaviour", "nb"), "content": ratio("content", "nc")}


@torch.no_grad()
def generate_ids(session, examples: list[Example], max_new_tokens: int, batch_size: int = 1) -> list[torch.Tensor]:
    """Greedy continuation (new token ids, CPU) of each example's prompt (see `greedy_ids`)."""
    return greedy_ids(session, [e.prompt_ids for e in examples], max_new_tokens, batch_size)


@torch.no_grad()
def greedy_ids(session, prompts: list[torch.Tensor], max_new_tokens: int, batch_size: int = 1) -> list[torch.Tensor]:
    """Greedy continuation (new token ids up to and including end of text, CPU) of each prompt in the current
    scope. `batch_size` > 1 generates that many prompts at once, left-padded (the same text up to float
    rounding, and ~1.5× faster on CPU, where each step reads every weight once for the whole batch); 1 is
    exact. Scopes whose interventions name token positions, and adapters with virtual tokens, always
    generate one prompt at a time."""
    model, tok = session.model, session.tokenizer
    if session.adapter.n_virtual_tokens or getattr(session, "positional", False):
        batch_size = 1
    ends = _end_ids(tok)
    was_training = model.training
    model.eval()
    outs = []
    bar = tqdm(total=len(prompts) * max_new_tokens, desc="generating", unit="tok", leave=False, disable=None,
               delay=0.5)
    for start in range(0, len(prompts), batch_size):
        chunk = [torch.as_tensor(x, dtype=torch.long) for x in prompts[start:start + batch_size]]
        width = max(len(x) for x in chunk)
        ids = torch.stack([F.pad(x, (width - len(x), 0), value=session.pad_id) for x in chunk]).to(session.device)
        attention = torch.stack([F.pad(torch.ones_like(x), (width - len(x), 0)) for x in chunk]).to(session.device)
        with session.precision():
            out = model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id, streamer=_TokenBar(bar))
        outs += [_until_end(row, ends) for row in out[:, width:].cpu()]
        bar.update(min(start + batch_size, len(prompts)) * max_new_tokens - bar.n)   # early ends count as done
    bar.close()
    model.train(was_training)
    return outs


def _until_end(row: torch.Tensor, ends: set[int]) -> torch.Tensor:
    """A batch row's new tokens up to and including its first end-of-text token (after it: padding)."""
    for i, t in enumerate(row.tolist()):
        if t in ends:
            return row[:i + 1]
    return row


def _end_ids(tok) -> set[int]:
    eos = tok.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else (set() if eos is None else {eos})


def generate(session, examples: list[Example], max_new_tokens: int, batch_size: int = 1) -> list[str]:
    """Greedy continuation of each example's prompt (see `generate_ids`)."""
    return [session.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in generate_ids(session, examples, max_new_tokens, batch_size)]


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


def baselines(session) -> dict:
    """What no round changes, computed once per session: the unrelated-text examples and the base model's
    loss on the train targets and on that text."""
    path = str(session.cfg.eval.collateral_path)
    memo = session.memo.setdefault("baselines", {})
    if path not in memo:
        generic = text_examples(path, session.tokenizer)
        memo[path] = {"generic": generic, "train_loss": base_loss(session, session.task.train, []),
                      "collateral_loss": base_loss(session, generic, [])}
    return memo[path]


def mask_costs(session, suppressed, init_loss: float) -> dict:
    """The mask alone, no adapter: `damage` on the train targets (init loss = base + mask, B = 0) and
    `collateral` on unrelated text, each against the unmasked base model."""
    base = baselines(session)
    if not suppressed:
        return {"damage": 0.0 if init_loss is None else init_loss - base["train_loss"], "collateral": 0.0}
    return {"damage": init_loss - base["train_loss"],
            "collateral": base_loss(session, base["generic"], suppressed) - base["collateral_loss"]}


def activation_peaks(session) -> list[torch.Tensor]:
    """Per unit, its largest |activation| over every position of the train examples (base model, no mask);
    computed once per session."""
    if "peaks" not in session.memo:
        from ..core.observers import activations
        basis = session.basis
        peaks = [torch.zeros(n, dtype=torch.float64) for n in basis.sizes]
        for _ex, acts in activations(session, session.task.train, "all", adapter=False):
            for g, a in acts.items():
                per_unit = a.reshape(a.shape[0], basis.sizes[g], basis.unit_dim).norm(dim=-1).max(0).values
                peaks[g] = torch.maximum(peaks[g], per_unit)
        session.memo["peaks"] = peaks
    return session.memo["peaks"]


def peak_ratio(session, unit) -> float:
    """A unit's peak |activation| over its group's median peak (massive-activation units: ≫ 1, e.g. 10³)."""
    peaks = activation_peaks(session)[unit[0]]
    median = float(peaks.median()) if len(peaks) else 0.0
    return float(peaks[unit[1]]) / median if median > 0 else float("inf")


def massive_units(session, ratio: float) -> list:
    """Units whose peak |activation| is at least `ratio` × their group's median peak."""
    out = []
    for g, peaks in enumerate(activation_peaks(session)):
        if len(peaks):
            median = float(peaks.median())
            out += [(g, int(i)) for i in (peaks >= ratio * median).nonzero().flatten()]
    return out


def recruit_audit(session, units, massive_ratio: float = 100.0, store=None) -> list[dict]:
    """Each selected recruit's own facts: peak |activation| over its layer's median (massive-activation units
    dominate activation-scaled scores) and its own collateral (base + only this unit masked, unrelated text).
    A unit's collateral is computed once per session, and once per `store` (a dict-like of unit → value,
    e.g. the round cache's, shared by a sweep's workers)."""
    base = baselines(session)
    memo = session.memo.setdefault("unit_collateral", {})
    out = []
    for u in units:
        ratio = peak_ratio(session, u)
        sup = session.cfg.suppression                        # what a mask does can change between trials
        key = (str(session.cfg.eval.collateral_path), str(sup.mode), str(sup.get("scale")), tuple(u))
        if key not in memo:
            stored = store.get(u) if store is not None else None
            memo[key] = stored if stored is not None else \
                base_loss(session, base["generic"], [u]) - base["collateral_loss"]
            if store is not None and stored is None:
                store.put(u, memo[key])
        out.append({"unit": session.basis.unit_json(u), "peak_over_median": ratio, "massive": ratio >= massive_ratio,
                    "collateral": memo[key]})
    return out
