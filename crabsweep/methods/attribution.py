"""Attribution: per-unit scores streamed from the training pass, and the global ranking.

All streamed methods of the training pass are captured at once, at the cost of one gradient hook per
site (for MoE experts, from the fused weight's gradient instead):
  lora_a_grad  Σ_steps ‖∂L/∂A[:, j]‖₂ over the rank rows of the site's LoRA A (the reference's measure;
               zero at step 0 since B=0, and biased by B's growth).
  grad_norm    Σ_steps ‖∂L/∂a_j‖₂ over the step's tokens, a_j the site input (the seed's wording).
  grad_x_act   Σ_steps |Σ_tokens a_j·∂L/∂a_j|  (= |Σ_h W[h,j]·∂L/∂W[h,j]| for the site's effective W).
  max_grad     max_steps ‖∂L/∂a_j‖₂.
For units with unit_dim > 1 (heads), norms and sums run over the unit's features too.
After training, on the train targets with the mask on and the weights frozen:
  integrated_gradients  (x_j − b_j)·∫₀¹ ∂L/∂x_j dt along b + t(x − b) at every layer at once, b the
               units' suppressed values (midpoint rule, `n_steps`); completeness Σ_j IG_j ≈ L(x) − L(b)
               is checked and recorded. Ranked by |IG|.
  cna          |mean activation (adapted) − mean activation (base)| over the task's examples (target
               tokens or the last prompt position), or |mean(positive) − mean(negative)| at the last
               position of `positive`/`negative` prompts; optionally drops "universal" units (in a
               layer's top-20 by |activation| on ≥ 80 % of generic prompts).
  relp         Σ_tokens a_j·∂M/∂a_j on the LRP-linearized model (see relp.py), M the targets' log-prob.
Suppressed units score 0: they are excluded from ranking.
"""

from __future__ import annotations

from functools import partial
from itertools import accumulate

import torch

from ..core.basis import Unit, UnitSpace, unit_json

STREAMED = ("lora_a_grad", "grad_norm", "grad_x_act", "max_grad")
POSTHOC = ("integrated_gradients", "cna", "relp")


def _zeros(space: UnitSpace) -> list[torch.Tensor]:
    return [torch.zeros(n, dtype=torch.float64) for n in space.sizes]


def exclude(scores: dict[str, list[torch.Tensor]], suppressed) -> dict[str, list[torch.Tensor]]:
    """Set the suppressed units' scores to 0 in place (they are never ranked); returns `scores`."""
    for layer, index in suppressed:
        for per_layer in scores.values():
            per_layer[layer][index] = 0.0
    return scores


class Recorder:
    """The attribution tap: accumulates per-step statistics, folded into totals at `end_step`."""

    def __init__(self, space: UnitSpace, methods=STREAMED):
        self.space = space
        self.methods = tuple(m for m in methods if m in STREAMED and m in space.supports)
        self.totals = {m: _zeros(space) for m in self.methods}
        self._g2 = [None] * len(space.sizes)
        self._ga = [None] * len(space.sizes)
        self.steps = 0

    def __call__(self, layer: int, x: torch.Tensor, a: torch.Tensor) -> None:
        if x.requires_grad:
            x.register_hook(partial(self._on_grad, layer, a))

    def _on_grad(self, layer: int, a: torch.Tensor, g: torch.Tensor) -> None:
        gv = self.space.unit_view(g.detach(), layer).float()
        g2 = gv.pow(2).sum((0, 2))
        ga = (self.space.unit_view(a, layer).float() * gv).sum((0, 2))
        self._g2[layer] = g2 if self._g2[layer] is None else self._g2[layer] + g2
        self._ga[layer] = ga if self._ga[layer] is None else self._ga[layer] + ga

    def end_step(self) -> None:
        """Fold this step's statistics in; call after backward(), before the optimizer step."""
        weight_stats = getattr(self.space, "weight_stats", None)
        for layer in range(len(self.space.sizes)):
            if not self.space.sizes[layer]:
                continue
            if "lora_a_grad" in self.methods:
                self.totals["lora_a_grad"][layer] += self.space.lora_a_grad(layer).double().cpu()
            if weight_stats is not None:
                self._g2[layer], self._ga[layer] = weight_stats(layer)
            if self._g2[layer] is None:
                continue
            norm = self._g2[layer].sqrt().double().cpu()
            if "grad_norm" in self.methods:
                self.totals["grad_norm"][layer] += norm
            if "max_grad" in self.methods:
                torch.maximum(self.totals["max_grad"][layer], norm, out=self.totals["max_grad"][layer])
            if "grad_x_act" in self.methods:
                self.totals["grad_x_act"][layer] += self._ga[layer].abs().double().cpu()
            self._g2[layer] = self._ga[layer] = None
        self.steps += 1

    def scores(self, suppressed: set[Unit]) -> dict[str, list[torch.Tensor]]:
        """Totals per method and layer (float32), suppressed units set to 0."""
        return exclude({m: [t.float().clone() for t in ts] for m, ts in self.totals.items()}, suppressed)


def rank(scores: list[torch.Tensor], exclude: set[Unit] = frozenset(), top: int | None = None) -> list[dict]:
    """Units ordered by score, highest first (ties: lower layer, then lower index), excluded dropped."""
    sizes = [len(s) for s in scores]
    flat = torch.cat([s.float() for s in scores])
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    index_of = torch.cat([torch.arange(n) for n in sizes])
    offsets = [0, *accumulate(sizes)]
    keep = torch.ones(len(flat), dtype=torch.bool)
    for layer, index in exclude:
        keep[offsets[layer] + index] = False
    candidates = keep.nonzero().squeeze(1)
    order = candidates[torch.sort(flat[candidates], descending=True, stable=True).indices]
    if top is not None:
        order = order[:top]
    return [{"unit": unit_json((int(layer_of[i]), int(index_of[i]))), "score": float(flat[i])}
            for i in order.tolist()]


# --------------------------------------------------------------------------------------------------
# Post-hoc methods (after training, weights frozen)
# --------------------------------------------------------------------------------------------------
def _objective(session, batch):
    from ..loop.train import token_losses
    weighted, plain, _ = token_losses(session.model, batch, session.device)
    return weighted if session.cfg.train.weighted else plain


def _accumulate_product(space, totals, layer, a, weight, g) -> None:
    """Gradient hook: totals[layer] += weight · Σ_tokens a·g per unit (returns None: g is not altered)."""
    totals[layer] += weight * (space.unit_view(a, layer).float() * space.unit_view(g, layer).float()).sum((0, 2)).double().cpu()


def integrated_gradients(session, n_steps: int) -> tuple[list[torch.Tensor], dict]:
    """Signed IG per unit over the train examples, and the completeness check."""
    from ..core.tasks import collate
    space, model = session.space, session.model
    totals = _zeros(space)

    def tap(layer, x, delta):
        if x.requires_grad:
            x.register_hook(partial(_accumulate_product, space, totals, layer, delta, 1.0 / n_steps))

    bs = int(session.cfg.eval.batch_size)
    batches = [collate(session.task.train[i:i + bs], session.pad_id) for i in range(0, len(session.task.train), bs)]
    ends = {}
    try:
        space.tap = tap
        for k in range(n_steps):
            space.path = (k + 0.5) / n_steps
            for batch in batches:
                _objective(session, batch).backward()
        space.tap = None
        with torch.no_grad():
            for t in (0.0, 1.0):
                space.path = t
                ends[t] = sum(float(_objective(session, b)) for b in batches)
    finally:
        space.tap = space.path = None
        model.zero_grad(set_to_none=True)
    total = float(sum(t.sum() for t in totals))
    gap = ends[1.0] - ends[0.0]
    check = {"sum_ig": total, "loss_actual": ends[1.0], "loss_baseline": ends[0.0],
             "ratio": total / gap if gap else None, "n_steps": n_steps}
    return [t.float() for t in totals], check


def _capture(session, texts_or_examples, positions: str, adapter: bool) -> list[torch.Tensor]:
    """Mean site activation per unit feature over the chosen positions."""
    from ..core.tasks import collate
    space, model = session.space, session.model
    sums = [torch.zeros(n * space.unit_dim, dtype=torch.float64) for n in space.sizes]
    count = [0]
    current: dict[int, torch.Tensor] = {}
    space.tap = lambda layer, x, delta: current.__setitem__(layer, x.detach())
    try:
        with torch.no_grad():
            for ex in texts_or_examples:
                current.clear()
                batch = collate([ex], session.pad_id)
                ids = batch["input_ids"].to(session.device)
                if adapter:
                    model(input_ids=ids)
                else:
                    with model.disable_adapter():
                        model(input_ids=ids)
                if positions == "target":
                    sel = (batch["labels"][0] != -100).nonzero().squeeze(1)
                elif positions == "all":
                    sel = torch.arange(ids.shape[1])
                else:   # the last prompt position (or the last token of a plain prompt)
                    sel = torch.tensor([len(ex.prompt_ids) - 1 if len(ex.prompt_ids) else len(ex.input_ids) - 1])
                for layer, x in current.items():
                    sums[layer] += x[0, sel.to(x.device)].double().sum(0).cpu()
                count[0] += len(sel)
    finally:
        space.tap = None
    return [s / max(count[0], 1) for s in sums]


def _prompt_examples(session, prompts) -> list:
    from ..core.tasks import Example, Sample, _render
    out = []
    for i, p in enumerate(prompts):
        ids = torch.tensor(session.tokenizer(_render(session.tokenizer, p, None), add_special_tokens=False)["input_ids"])
        out.append(Example(Sample(f"prompt:{i}", p, "", "config"), ids, torch.full_like(ids, -100),
                           torch.zeros(len(ids)), ids))
    return out


def cna(session, acfg) -> list[torch.Tensor]:
    space = session.space
    if acfg.get("positive") and acfg.get("negative"):
        pos = _capture(session, _prompt_examples(session, acfg.positive), "last", adapter=False)
        neg = _capture(session, _prompt_examples(session, acfg.negative), "last", adapter=False)
    else:
        pos = _capture(session, session.task.train, acfg.get("positions", "target"), adapter=True)
        neg = _capture(session, session.task.train, acfg.get("positions", "target"), adapter=False)
    scores = [(p - n).reshape(len(p) // space.unit_dim if space.unit_dim else 0, space.unit_dim).norm(dim=1).float()
              if len(p) else torch.zeros(0) for p, n in zip(pos, neg)]
    if acfg.get("filter_universal"):
        for layer, index in universal_units(session, int(acfg.get("universal_top", 20)),
                                            float(acfg.get("universal_fraction", 0.8))):
            scores[layer][index] = 0.0
    return scores


def universal_units(session, top: int, fraction: float) -> list[tuple[int, int]]:
    """Units in their layer's top-`top` by |activation| (last position) on ≥ `fraction` of generic prompts."""
    import json
    space = session.space
    texts = json.loads(open(session.cfg.eval.collateral_path).read())["texts"]
    counts = [torch.zeros(n) for n in space.sizes]
    for ex in _prompt_examples(session, texts):
        acts = _capture(session, [ex], "last", adapter=False)
        for layer, a in enumerate(acts):
            if len(a):
                per_unit = a.reshape(space.sizes[layer], space.unit_dim).norm(dim=1)
                counts[layer][per_unit.topk(min(top, len(per_unit))).indices] += 1
    return [(layer, int(i)) for layer, c in enumerate(counts) for i in (c >= fraction * len(texts)).nonzero().flatten()]


def unit_means(session) -> list[torch.Tensor]:
    """Each unit feature's mean activation over the task's train prompts (base model, no mask)."""
    session.space.set_suppression([])
    means = _capture(session, [_as_prompt(ex) for ex in session.task.train], "all", adapter=False)
    return [m.float().to(session.device) for m in means]


def _as_prompt(ex):
    from ..core.tasks import Example
    ids = ex.prompt_ids
    return Example(ex.sample, ids, torch.full_like(ids, -100), torch.zeros(len(ids)), ids)
