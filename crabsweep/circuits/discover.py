"""Circuit discovery: RelP (prompts + target tokens) or contrastive activations (positive vs negative prompts).

    import crabsweep as cs
    session = cs.load_session()                                   # SmolLM2, the shipped capitals set
    found = cs.discover(session, out_dir="runs/capitals")          # circuit.json + units.json
    found = cs.discover(session, method="contrastive", k=100)      # the prompt set's positive/negative
    found = cs.discover(session, prompt="The capital of France is", target=" Paris", select="threshold")

RelP (methods/relp.py `linearized`: LN-rule, act rule, half rule; weights untouched, no weight gradients):
one forward and backward per prompt of the base model (adapter off); the score of a unit at a position is
a·∂M/∂a at its site, with M at the last position the logit difference target − counterfactual (default:
the most likely other token, fixed once per prompt and recorded), the target's log-probability, or its
logit. A target is its FIRST sub-token. Several prompts are aligned at their ends (position −1 = each
prompt's last token) and averaged (`aggregate=mean`, a missing position counts 0) or reduced to the
signed value of largest magnitude (`any`); `positions=sum` scores each unit summed over positions.
Position 0 is left out (`skip_positions=first`, the reference's filter_bos): whatever token it holds it is
the attention sink, whose massive activations (SmolLM2 L28:678, L9:200, L11:1229) otherwise top the
ranking and, ablated, break every prediction; `bos` leaves out BOS-token positions only.
Layers 0–1 are left out by default for both methods (`skip_layers`; the reference did so for contrastive
only): their neurons act on the token embeddings at every position — on SmolLM2, ablating L0:767 alone
drops unrelated facts by 46 %. Both methods leave out the universal units by default (the reference did
for RelP only, though its README claims it for contrastive too; on SmolLM2's `caps` set the top-20
contrastive circuit drops unrelated facts by 0.5 % with them left out, by 54 % (top-50) without).

Contrastive: the mean(positive) − mean(negative) activation at the last position (fp64, signed) in units
of the unit's own spread (`contrast=standardized`, the default: Cohen's d, over the pooled standard
deviation of the two lists, floored at a tenth of its layer's median so a nearly constant unit cannot win
by dividing by ~0), or the raw difference (`contrast=difference`, the reference's CNA score). The raw
difference is dominated by the last layers' large-activation neurons, which carry next-token prediction
for every text: on SmolLM2's `caps` set, zeroing the top-200 by difference drops the upper-case targets by
100 % but unrelated facts by 86 %; the top-200 by Cohen's d drop the targets by 99.7 % and unrelated facts
by −0.9 % (random sets of the same per-layer sizes: −1.8 %, −0.8 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.observers import Capture, activations, prompt_examples
from ..core.tasks import render
from ..errors import UserError
from ..methods.cna import per_unit
from ..methods.relp import linearized
from .circuit import Circuit
from .config import options
from .report import check_fresh
from .prompts import Item, PromptSet, encode, load_prompt_set, prompt_list, token_id
from .select import Attribution, excluded, select

log = logging.getLogger(__name__)


@dataclass
class Discovery:
    circuit: Circuit
    attribution: Attribution                  # every entry's score, before selection
    excluded: list[tuple[int, int]] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


# -- RelP ---------------------------------------------------------------------------------------------
def metric_fn(name: str, target: int, counterfactual: int | None):
    """M(logits at the last position) for a metric name."""
    if name == "logit_diff":
        if counterfactual is None:
            raise UserError("discover.metric=logit_diff needs a counterfactual; set discover.counterfactual=auto "
                            "or a token, or use discover.metric=logprob")
        return lambda lo: lo[target] - lo[counterfactual]
    if name == "logprob":
        return lambda lo: torch.log_softmax(lo, -1)[target]
    return lambda lo: lo[target]


def auto_counterfactual(logits: torch.Tensor, target: int) -> int:
    """The most likely token other than the target (the second most likely when the target is first)."""
    rest = logits.detach().clone()
    rest[target] = float("-inf")
    return int(rest.argmax())


def relp_scores(session, ids: torch.Tensor, target: int, counterfactual: str | int | None = "auto",
                metric: str = "logit_diff") -> tuple[list[torch.Tensor], float, int | None]:
    """a·∂M/∂a per (position, unit) of every group [T, n] for one prompt; M's value; the counterfactual id."""
    basis, model = session.basis, session.model
    cap = Capture(graph=True)
    with session.adapter.disabled(), linearized(model, session.loaded.arch), session.observe(cap), \
            torch.enable_grad():
        with session.precision():
            logits = model(input_ids=ids[None].to(session.device)).logits[0, -1].float()
        cf = auto_counterfactual(logits, target) if counterfactual == "auto" else counterfactual
        m = metric_fn(metric, target, cf)(logits)
        groups = [g for g in basis.groups if g in cap.acts]
        grads = torch.autograd.grad(m, [cap.acts[g] for g in groups], allow_unused=True)
    t = len(ids)
    out = [torch.zeros(t, n, dtype=torch.float64) for n in basis.sizes]
    for g, grad in zip(groups, grads):
        if grad is not None:
            prod = cap.acts[g].detach().float() * grad.float()
            out[g] = prod.reshape(t, basis.sizes[g], basis.unit_dim).sum(-1).double().cpu()
    return out, float(m.detach()), cf


def _skip_rows(session, ids: torch.Tensor, how: str) -> torch.Tensor:
    bos = session.tokenizer.bos_token_id
    if how == "bos" and bos is not None:
        return (ids == bos).nonzero().flatten()
    if how == "first":
        return torch.tensor([0])
    return torch.zeros(0, dtype=torch.long)


def relp(session, dcfg, items: list[Item], chat: bool) -> Attribution:
    """RelP attribution of `items` (prompt + target [+ counterfactual]) aggregated as configured."""
    tok = session.tokenizer
    per_prompt, metrics, cfs = [], [], []
    for item, ids in zip(items, encode(session, [i.prompt for i in items], chat)):
        target = token_id(tok, item.target)
        cf_spec = item.counterfactual or dcfg.counterfactual
        cf = token_id(tok, cf_spec, "counterfactual") if cf_spec not in ("auto", None) else cf_spec
        scores, value, cf = relp_scores(session, ids, target, cf, dcfg.metric)
        for s in scores:
            s[_skip_rows(session, ids, dcfg.skip_positions)] = 0.0
        per_prompt.append(scores)
        metrics.append(value)
        cfs.append(None if cf is None else tok.decode([cf]))
    lengths = [len(s[0]) for s in per_prompt]
    meta = {"method": "relp", "metric": dcfg.metric, "counterfactuals": cfs, "metrics": metrics}
    if dcfg.positions == "sum":
        grids = [[s.sum(0, keepdim=True) for s in scores] for scores in per_prompt]
        rows, kind = [-1], "none"
    elif len(items) == 1:
        grids, rows, kind = per_prompt, list(range(lengths[0])), "absolute"
        meta["prompt_tokens"] = lengths[0]
    else:
        t = max(lengths)
        grids = [[torch.cat([s.new_zeros(t - len(s), s.shape[1]), s]) for s in scores] for scores in per_prompt]
        rows, kind = list(range(-t, 0)), "from_end"
    stacked = [torch.stack([grid[g] for grid in grids]) for g in range(len(session.basis.sizes))]
    if dcfg.aggregate == "mean":
        scores = [s.mean(0) for s in stacked]
    else:
        scores = [s.gather(0, s.abs().argmax(0, keepdim=True)).squeeze(0) for s in stacked]
    return Attribution(scores, rows, kind, sum(metrics) / len(metrics), meta)


# -- contrastive --------------------------------------------------------------------------------------
def last_activations(session, prompts: list[str], chat: bool) -> list[torch.Tensor]:
    """Each group's features at the last position of every prompt [n_prompts, n·d], base model, fp64."""
    rows: list[list[torch.Tensor]] = [[] for _ in session.basis.sizes]
    for _ex, acts in activations(session, prompt_examples(session, prompts, chat), "last", adapter=False):
        for g, a in acts.items():
            rows[g].append(a[-1])
    return [torch.stack(r) if r else torch.zeros(len(prompts), n * session.basis.unit_dim, dtype=torch.float64)
            for r, n in zip(rows, session.basis.sizes)]


def contrast_scores(pos: torch.Tensor, neg: torch.Tensor, how: str) -> torch.Tensor:
    """Per feature: mean difference, or Cohen's d with the pooled deviation floored at 0.1 × its median."""
    diff = pos.mean(0) - neg.mean(0)
    if how == "difference":
        return diff
    var = lambda x: x.var(0, unbiased=True) if len(x) > 1 else torch.zeros_like(x[0])  # noqa: E731
    sd = ((var(pos) + var(neg)) / 2).sqrt()
    live = sd[sd > 0]
    floor = 0.1 * float(live.median()) if live.numel() else 1.0
    return diff / sd.clamp_min(floor)


def contrastive(session, positive: list[str], negative: list[str], chat: bool,
                how: str = "difference") -> Attribution:
    """Signed mean(positive) − mean(negative) per unit at the last position (row −1), or its Cohen's d."""
    pos, neg = last_activations(session, positive, chat), last_activations(session, negative, chat)
    delta = per_unit(session.basis, [contrast_scores(p, n, how) for p, n in zip(pos, neg)])
    return Attribution([d.double()[None] for d in delta], [-1], "last", None,
                       {"method": "contrastive", "contrast": how, "positive": positive, "negative": negative})


# -- the command --------------------------------------------------------------------------------------
def discover(session, out_dir: str | Path | None = None, prompts: PromptSet | str | None = None,
             **overrides) -> Discovery:
    """Discover a circuit (config section `discover`, keyword overrides on top); with `out_dir`, write
    `circuit.json` (the reference's format) and `units.json` there."""
    ccfg, dcfg = options(session.cfg, "circuit"), options(session.cfg, "discover", overrides)
    check_fresh(out_dir, "discover")
    ps = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts or ccfg.prompts, ccfg.chat, session)
    tok = session.tokenizer
    if dcfg.method == "relp":
        items = [Item(dcfg.prompt, dcfg.target)] if dcfg.prompt is not None else [i for i in ps.items if i.target]
        if not items:
            raise UserError(f"prompt set '{ps.name}' has no prompts with a target; give discover.prompt and "
                            "discover.target or a set with targets")
        attr = relp(session, dcfg, items, ps.chat)
        if len(items) == 1:
            text = render(tok, items[0].prompt, None) if ps.chat else items[0].prompt
            header = (text, items[0].target)
        else:
            header = (f"[{len(items)} prompts, agg={dcfg.aggregate}]", str([i.target for i in items[:3]]))
        attr.meta.update(prompts=[i.prompt for i in items], targets=[i.target for i in items])
    else:
        pos = prompt_list(dcfg.positive, "discover.positive") if dcfg.positive is not None else ps.positive
        neg = prompt_list(dcfg.negative, "discover.negative") if dcfg.negative is not None else ps.negative
        if not pos or not neg:
            raise UserError(f"contrastive discovery needs positive and negative prompts; prompt set '{ps.name}' "
                            "has none: give discover.positive=… discover.negative=… (lists or files)")
        attr = contrastive(session, pos, neg, ps.chat, dcfg.contrast)
        header = (f"[contrastive: {len(pos)} pos vs {len(neg)} neg]", "[contrastive]")
    out_of = excluded(session, dcfg)
    skip = [g for g in dcfg.skip_layers if 0 <= g < len(session.basis.sizes)]
    entries = select(attr, dcfg, out_of, skip)
    meta = {"granularity": session.basis.name, **attr.meta, "positions": attr.positions, "chat": ps.chat,
            "prompt_set": ps.name, "model": session.loaded.fingerprint,
            "selection": {k: getattr(dcfg, k) for k in ("select", "k", "threshold", "percentage", "per_layer_k")},
            "skip_layers": list(skip), "skip_positions": dcfg.skip_positions, "aggregate": dcfg.aggregate,
            "excluded": {"universal": dcfg.exclude_universal, "massive_ratio": dcfg.exclude_massive,
                         "units": [list(u) for u in sorted(out_of)]}}
    if not entries:
        raise UserError(f"discover selected no units: every score is zero after skipping layers {skip} and "
                        f"excluding {len(out_of)} units, or select={dcfg.select} keeps none; change "
                        "discover.skip_layers or the selection")
    metric = attr.metric if attr.metric is not None else 0.0
    circuit = Circuit(dict(entries), header[0], header[1], metric, meta)
    log.info("discovered %d entries (%d units) by %s/%s", len(circuit), len(circuit.units()), meta["method"], dcfg.select)
    found = Discovery(circuit, attr, sorted(out_of))
    if out_dir is not None:
        out = Path(out_dir)
        found.paths = {"circuit": circuit.save(out / "circuit.json"),
                       "units": circuit.save_units(out / "units.json", session.basis)}
    return found
