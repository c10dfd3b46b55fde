"""Faithfulness and completeness of a circuit: the TransluceAI protocol the neural-steering reference used.

    import crabsweep as cs
    result = cs.faithfulness(session, "runs/capitals/circuit.json", out_dir="runs/faith")
    result = cs.faithfulness(session)          # discover (RelP, `discover` config) and rank every attributed unit

A metric F over the prompt set (mean over prompts of logit[target] − logit[counterfactual] at the last
position; the counterfactual is the item's, or the most likely other token of the unmodified model, fixed
once per prompt) is measured with units mean-ablated: x_j ← the mean of unit j over the patch prompts
(the set's `patch` prompts — TransluceAI's paired mode — or the prompts themselves, `patch=nopair`), per
position with prompts aligned at their ends (`means=position`; a position no patch prompt reaches takes
the overall mean) or one mean per unit (`means=global`). Every unit of the basis takes part:
  F(M)    nothing ablated          F(∅)    every unit ablated
  F(C)    all but C ablated        F(M\\C)  only C ablated
  faithfulness = (F(C) − F(∅)) / (F(M) − F(∅))      completeness = (F(M\\C) − F(∅)) / (F(M) − F(∅))
(completeness: lower = the circuit is more complete). C = the top p % of the ranked units (positions
collapsed; ⌈p·N/100⌉ units), swept over `faithfulness.percentages`. So C = every unit gives exactly 1 and
C = ∅ exactly 0. `chain_round_faithfulness` applies the same to a chain round's recruits with F = the mean
log-probability of the task's target tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.interventions import Intervention
from ..core.observers import activations, mean_activations, prompt_examples
from ..core.tasks import collate
from ..errors import UserError
from .circuit import Circuit, load_source
from .config import options
from .report import check_fresh
from .discover import Discovery, auto_counterfactual, discover
from .prompts import PromptSet, load_prompt_set, token_id


@dataclass(frozen=True)
class MeanPatch(Intervention):
    """x_j ← mean_j for the `selected` units of each group (bool [n] per group); a group's mean is [T, n·d]
    (per position of the current prompt) or [n·d]."""

    selected: dict = field(default_factory=dict, compare=False)
    means: Sequence[torch.Tensor] = field(default=(), repr=False, compare=False)

    def groups(self) -> set[int]:
        return {g for g, s in self.selected.items() if bool(s.any())}

    def compile(self, basis, group):
        sel = self.selected.get(group)
        if sel is None or not bool(sel.any()):
            return None
        cols = sel.repeat_interleave(basis.unit_dim).to(basis.device)
        mean = self.means[group].to(basis.device, basis.dtype)
        return lambda x: torch.where(cols, mean, x)


class Protocol:
    """The four conditions over a fixed set of runs: (input ids, per-group means, metric of the logits).

    `universe`: the units the analysis may ablate (bool [n] per group; default every unit) — units outside
    it (e.g. layers the discovery skipped) keep their clean values in every condition, so F(∅) ablates the
    whole universe and the full attributed set is faithful (1) and complete (0) by construction."""

    def __init__(self, session, runs: list[tuple[torch.Tensor, list[torch.Tensor], object]], universe=None):
        self.session, self.runs = session, runs
        self.sizes = session.basis.sizes
        self.universe = universe or {g: torch.ones(n, dtype=torch.bool) for g, n in enumerate(self.sizes) if n}
        self.f_model = self.F({})
        self.f_empty = self.F(self.universe)

    @torch.no_grad()
    def F(self, selected: dict) -> float:
        s = self.session
        total = 0.0
        with s.adapter.disabled():
            for ids, means, metric in self.runs:
                with s.intervene(MeanPatch(selected, means)), s.precision():
                    logits = s.model(input_ids=ids[None].to(s.device)).logits[0].float()
                total += float(metric(logits))
        return total / len(self.runs)

    def measure(self, units) -> dict:
        """F(C), F(M\\C), faithfulness and completeness of the unit set C."""
        keep = {g: u.clone() for g, u in self.universe.items()}
        only = {g: torch.zeros(n, dtype=torch.bool) for g, n in enumerate(self.sizes) if n}
        for g, i in units:
            keep[g][i], only[g][i] = False, True
        fc, fcomp = self.F(keep), self.F(only)
        denom = self.f_model - self.f_empty
        ratio = (lambda f: (f - self.f_empty) / denom) if abs(denom) > 1e-10 else (lambda f: math.nan)
        return {"n_units": len(units), "f_circuit": fc, "f_complement": fcomp, "faithfulness": ratio(fc),
                "completeness": ratio(fcomp)}


def position_means(session, prompts: list[str], chat: bool):
    """Means of every feature over `prompts`: {positions from the end (1 = last): per group [F]}, and overall."""
    sizes, d = session.basis.sizes, session.basis.unit_dim
    seqs = [acts for _ex, acts in activations(session, prompt_examples(session, prompts, chat), "all", adapter=False)]

    def mean(g, rows):
        return torch.stack(rows).mean(0).float() if g in seqs[0] else torch.zeros(sizes[g] * d)
    overall = [mean(g, [r for a in seqs for r in a[g]] if g in seqs[0] else []) for g in range(len(sizes))]
    longest = max(len(next(iter(a.values()))) for a in seqs)
    by_back = {b: [mean(g, [a[g][-b] for a in seqs if len(a[g]) >= b] if g in seqs[0] else [])
                   for g in range(len(sizes))] for b in range(1, longest + 1)}
    return by_back, overall


def _table(by_back: dict, overall: list[torch.Tensor], t: int) -> list[torch.Tensor]:
    """Per group [t, F]: the mean at each position of a t-token prompt (aligned at the end)."""
    return [torch.stack([by_back[t - j][g] if (t - j) in by_back else overall[g] for j in range(t)])
            for g in range(len(overall))]


def _universe(session, meta: dict) -> dict:
    """Every unit but those the discovery could not select: its skipped layers and excluded units."""
    out = {g: torch.ones(n, dtype=torch.bool) for g, n in enumerate(session.basis.sizes) if n}
    for g in meta.get("skip_layers", []):
        if g in out:
            out[g][:] = False
    excluded = meta.get("excluded")                           # a Discovery's units; a circuit file records only
    for g, i in excluded if isinstance(excluded, list) else []:   # the exclusion settings
        if g in out:
            out[g][i] = False
    return out


def _ranking(session, source) -> tuple[list, dict]:
    if source is None:
        source = discover(session)
    if isinstance(source, Discovery):
        scores = source.attribution.unit_scores()          # what the discovery could select: skipped layers and
        for g in source.circuit.meta.get("skip_layers", []):   # excluded units are not attributed
            scores[g].zero_()
        for g, i in source.excluded:
            scores[g][i] = 0.0
        flat = [(g, i, float(v)) for g, s in enumerate(scores) for i, v in enumerate(s.tolist()) if v != 0.0]
        flat.sort(key=lambda x: -abs(x[2]))
        return [(g, i) for g, i, _ in flat], {**source.circuit.meta, "excluded": [tuple(map(int, u)) for u in source.excluded]}
    circuit = source if isinstance(source, Circuit) else load_source(source, session.basis)
    return session.basis.check(circuit.units(), "circuit unit"), circuit.meta


def faithfulness(session, source=None, out_dir: str | Path | None = None, prompts: PromptSet | str | None = None,
                 tracker=None, **overrides) -> dict:
    """The faithfulness/completeness sweep of `source` (a circuit, unit set, Discovery, or None: discover)."""
    ccfg, fcfg = options(session.cfg, "circuit"), options(session.cfg, "faithfulness", overrides)
    check_fresh(out_dir, "faithfulness")
    if session.basis.name == "moe_expert":
        raise UserError("faithfulness mean-ablates per-token features; suppression=moe_expert has none")
    ps = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts or ccfg.prompts, ccfg.chat, session)
    items = [i for i in ps.items if i.target]
    if not items:
        raise UserError(f"prompt set '{ps.name}' has no prompts with targets; faithfulness needs prompt + target")
    ranking, meta = _ranking(session, source)
    paired = fcfg.patch == "auto" and bool(ps.patch)
    by_back, overall = position_means(session, ps.patch if paired else [i.prompt for i in items], ps.chat)
    tok = session.tokenizer
    runs, cfs = [], []
    for item, ex in zip(items, prompt_examples(session, [i.prompt for i in items], ps.chat)):
        ids, target = ex.input_ids, token_id(tok, item.target)
        if item.counterfactual:
            cf = token_id(tok, item.counterfactual, "counterfactual")
        else:
            with torch.no_grad(), session.adapter.disabled(), session.precision():
                cf = auto_counterfactual(session.model(input_ids=ids[None].to(session.device)).logits[0, -1].float(),
                                         target)
        cfs.append(tok.decode([cf]))
        means = _table(by_back, overall, len(ids)) if fcfg.means == "position" else overall
        runs.append((ids, means, lambda lo, t=target, c=cf: lo[-1, t] - lo[-1, c]))
    proto = Protocol(session, runs, _universe(session, meta))
    n_model = session.basis.n_units
    rows = []
    for pct in fcfg.percentages:
        n = min(len(ranking), math.ceil(pct / 100 * len(ranking) - 1e-9))
        rows.append({"percent": pct, "percent_model": 100 * n / n_model, **proto.measure(ranking[:n])})
    result = {"prompt_set": ps.name, "metric": "logit difference target − counterfactual", "means": fcfg.means,
              "patch": "paired" if paired else "nopair", "granularity": session.basis.name, "n_ranked": len(ranking),
              "n_model": n_model, "f_model": proto.f_model, "f_empty": proto.f_empty, "counterfactuals": cfs,
              "source": meta.get("method", "circuit"), "rows": rows}
    if out_dir is not None:
        from .report import finish_faithfulness
        finish_faithfulness(result, Path(out_dir), tracker)
    return result


def chain_round_faithfulness(session, units) -> dict:
    """Are a chain round's recruits a circuit of the task? Faithfulness and completeness of `units` in the base
    model (adapter off), F = the mean log-probability per target token of the task's train examples, each
    unit's mean taken over every token of those examples."""
    examples = session.task.train
    if session.basis.name == "moe_expert" or not examples or not units:
        return {}
    means = [m.float() for m in mean_activations(session, examples, "all", adapter=False)]
    runs = []
    for ex in examples:
        labels = collate([ex], session.pad_id)["labels"][0]

        def logprob(lo, labels=labels):
            keep = labels[1:] != -100
            lp = torch.log_softmax(lo[:-1], -1)[keep.to(lo.device)]
            return lp.gather(1, labels[1:][keep].to(lo.device)[:, None]).mean()
        runs.append((ex.input_ids, means, logprob))
    proto = Protocol(session, runs)
    out = proto.measure(list(units))
    return {"faithfulness": out["faithfulness"], "completeness": out["completeness"],
            "faithfulness_f_model": proto.f_model, "faithfulness_f_empty": proto.f_empty,
            "faithfulness_f_circuit": out["f_circuit"], "faithfulness_f_complement": out["f_complement"]}
