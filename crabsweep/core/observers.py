"""Observers: what attribution and analysis read off a forward (and backward) pass.

An observer is a tap `tap(group, x, a)` given every site's features `x` (which carries ∂L/∂x: register
a hook on it) and their detached activation `a`. `Session.observe(tap)` scopes it like an intervention;
inside `Session.intervene(...)` it sees the intervened features.

  Capture          keeps the last forward's activations per group (detached, or with their graph)
  GradientProduct  accumulates weight · Σ_tokens a·∂M/∂a per unit (RelP, integrated gradients, edges)
and the helpers every method shares: `mean_activations` over chosen positions of examples, and
`prompt_examples` (prompts as examples, chat-formatted or raw).
"""

from __future__ import annotations

from functools import partial

import torch

from .tasks import Example, Sample, collate, render


class Capture:
    """Tap that keeps the latest activations of every group (on their device): detached, or with
    `graph=True` the features themselves, so `torch.autograd.grad(M, [acts[g] …])` gives ∂M/∂x."""

    def __init__(self, graph: bool = False):
        self.graph = graph
        self.acts: dict[int, torch.Tensor] = {}

    def __call__(self, group: int, x: torch.Tensor, a: torch.Tensor) -> None:
        self.acts[group] = x if self.graph else a


class GradientProduct:
    """Tap accumulating `weight`·Σ_tokens a·∂M/∂a per unit into `totals[group]` (float64, CPU)."""

    def __init__(self, basis, weight: float = 1.0):
        self.basis, self.weight = basis, weight
        self.totals = [torch.zeros(n, dtype=torch.float64) for n in basis.sizes]

    def __call__(self, group: int, x: torch.Tensor, a: torch.Tensor) -> None:
        if x.requires_grad:
            x.register_hook(partial(self._add, group, a))

    def _add(self, group: int, a: torch.Tensor, g: torch.Tensor) -> None:
        prod = self.basis.view(a, group).float() * self.basis.view(g, group).float()
        self.totals[group] += self.weight * prod.sum((0, 2)).double().cpu()


def prompt_examples(session, prompts: list[str], chat: bool = True) -> list[Example]:
    """Prompts as examples: chat-formatted with a generation prompt (or raw text with BOS), no labels."""
    tok = session.tokenizer
    out = []
    for i, p in enumerate(prompts):
        if chat:
            ids = tok(render(tok, p, None), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(p, add_special_tokens=True)["input_ids"]
        ids = torch.tensor(ids, dtype=torch.long)
        out.append(Example(Sample(f"prompt:{i}", p, "", "config"), ids, torch.full_like(ids, -100),
                           torch.zeros(len(ids)), ids))
    return out


def as_prompt(ex: Example) -> Example:
    """An example cut to its prompt (what generation starts from)."""
    ids = ex.prompt_ids
    return Example(ex.sample, ids, torch.full_like(ids, -100), torch.zeros(len(ids)), ids)


def positions_of(ex: Example, which: str) -> torch.Tensor:
    """Token positions of `ex`: `target` (labelled), `all`, or `last` (the last prompt token)."""
    if which == "target":
        return (ex.labels != -100).nonzero().squeeze(1)
    if which == "all":
        return torch.arange(len(ex.input_ids))
    return torch.tensor([len(ex.prompt_ids) - 1 if len(ex.prompt_ids) else len(ex.input_ids) - 1])


@torch.no_grad()
def activations(session, examples: list[Example], which: str = "last", adapter: bool = True):
    """Yield (example, {group: activations at the chosen positions [P, n·d] on CPU, float64})."""
    cap = Capture()
    v = session.adapter.n_virtual_tokens if adapter else 0
    with session.observe(cap):
        for ex in examples:
            cap.acts.clear()
            batch = collate([ex], session.pad_id)
            ids = batch["input_ids"].to(session.device)
            with session.precision():
                if adapter:
                    session.model(input_ids=ids)
                else:
                    with session.adapter.disabled():
                        session.model(input_ids=ids)
            sel = positions_of(ex, which) + v
            yield ex, {g: a[0, sel.to(a.device)].double().cpu() for g, a in cap.acts.items()}


def mean_activations(session, examples: list[Example], which: str = "last", adapter: bool = True) -> list[torch.Tensor]:
    """Each feature's mean activation over the chosen positions of `examples` (zeros for empty groups)."""
    sums = [torch.zeros(n * session.basis.unit_dim, dtype=torch.float64) for n in session.basis.sizes]
    count = 0
    for _ex, acts in activations(session, examples, which, adapter):
        for g, a in acts.items():
            sums[g] += a.sum(0)
        count += len(next(iter(acts.values()))) if acts else 0
    return [s / max(count, 1) for s in sums]
