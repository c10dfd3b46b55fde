"""Steering: scale a circuit's units by each multiplier (or add a CAA vector with each strength) and measure
what changes — behaviour, specificity and generation quality.

    import crabsweep as cs
    session = cs.load_session()
    result = cs.steer(session, "runs/capitals/circuit.json", multipliers=[0, 1, 2], out_dir="runs/steer")
    result = cs.steer(session, "runs/c1", units="recruits", round=2, suppress="runs/c1/units.json")
    result = cs.steer(session, None, caa=True, prompts="caps")          # the CAA baseline alone

Per setting (multiplier m, or CAA strength α), on the base model (adapter off), one prompt at a time:
  target_prob / heldout_prob / control_prob   mean next-token probability of each item's target (its first
                                              sub-token) on the set's prompts, held-out prompts and
                                              unrelated control prompts; `*_change` relative to no steering
  tokens      the mean next-token probability of each of `steer.tokens`
  score       the task scorer (circuit.prompts=task) or "the generation starts with the target"
  ce          cross-entropy (nats/token) of the greedy steered continuation under the unmodified model
  degeneracy  the repeated word-3-gram rate of those continuations (loop/ensemble.py)
  random      the same probabilities under matched random unit sets (same count per layer; mean of
              `steer.random_controls`), the specificity control
Steering is `Scale(units, m)` at every position, or at the circuit's own positions (`positions=circuit`);
a suppression set S (`steer.suppress`) stays masked throughout, the no-steering baseline included.
CAA (contrastive activation addition): v = mean residual after layer `caa_layer` at the last position of
the positive prompts − that of the negative ones; x ← x + α·v at every position.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.basis import GRANULARITIES, Unit
from ..core.interventions import Add, Scale
from ..core.observers import Capture, prompt_examples
from ..errors import UserError
from ..loop.ensemble import degeneracy
from ..loop.metrics import generate_ids
from ..methods.selection import matched_random
from .circuit import Circuit, load_source
from .config import options
from .report import check_fresh
from .prompts import PromptSet, load_prompt_set, token_id

log = logging.getLogger(__name__)


# -- what a setting does to the model -----------------------------------------------------------------
def steering(session, circuit: Circuit, multiplier: float, positions: str = "all", suppress=()) -> list:
    """The interventions of one setting: S masked (if any), then the circuit's units scaled by `multiplier`
    at every position or at each entry's own position."""
    ivs = [session.mask(list(suppress))] if suppress else []
    if positions == "all":
        return ivs + [Scale(tuple(circuit.units()), float(multiplier))]
    at: dict[int | None, list[Unit]] = {}
    for g, p, i in circuit.neurons:
        at.setdefault(circuit.steer_position(p), []).append(Unit(g, i))
    return ivs + [Scale(tuple(dict.fromkeys(units)), float(multiplier), positions=None if p is None else (p,))
                  for p, units in at.items()]


def random_twin(circuit: Circuit, sizes: list[int], seed: int, avoid=()) -> Circuit:
    """A circuit whose units are uniformly random others of the same layers (same count per layer, same
    positions), none in the circuit or in `avoid`."""
    units = circuit.units()
    picks = matched_random(units, sizes, seed, avoid)
    by_layer: dict[int, list[int]] = {}
    for g, i in picks:
        by_layer.setdefault(g, []).append(i)
    twin: dict[Unit, Unit] = {}
    for g in sorted({g for g, _ in units}):
        own = sorted(i for gg, i in units if gg == g)
        twin.update({Unit(g, i): Unit(g, j) for i, j in zip(own, by_layer[g])})
    return circuit.subset([((g, p, twin[Unit(g, i)][1]), v) for (g, p, i), v in circuit.neurons.items()])


class CAA:
    """Contrastive activation addition at the residual stream after decoder layer `layer`."""

    def __init__(self, session, positive: list[str], negative: list[str], layer: int | None, chat: bool):
        n = len(session.loaded.arch.decoder_layers(session.model))
        self.layer = n // 2 if layer is None else layer
        if not 0 <= self.layer < n:
            raise UserError(f"steer.caa_layer={layer}: the model has layers 0..{n - 1}")
        if not positive or not negative:
            raise UserError("CAA needs the prompt set's positive and negative prompts; use a set that has them "
                            "(e.g. circuit.prompts=caps)")
        self.session = session
        self.basis = GRANULARITIES.get("residual_dim").obj(session.loaded, {"layers": [self.layer]})
        pos, neg = self._mean_last(positive, chat), self._mean_last(negative, chat)
        self.vector = pos - neg
        log.info("CAA vector at layer %d: |v| = %.3f (|mean positive| = %.3f)", self.layer,
                 float(self.vector.norm()), float(pos.norm()))

    @torch.no_grad()
    def _mean_last(self, prompts: list[str], chat: bool) -> torch.Tensor:
        s, cap = self.session, Capture()
        total = torch.zeros(self.basis.sizes[self.layer], dtype=torch.float64)
        handle = self.basis.observe(s.model, cap)
        try:
            with s.adapter.disabled():
                for ex in prompt_examples(s, prompts, chat):
                    with s.precision():
                        s.model(input_ids=ex.input_ids[None].to(s.device))
                    total += cap.acts[self.layer][0, -1].double().cpu()
        finally:
            handle.remove()
        return (total / len(prompts)).float()

    @contextmanager
    def added(self, alpha: float):
        handle = self.basis.apply(self.session.model, Add(self.layer, self.vector, float(alpha)))
        try:
            yield
        finally:
            handle.remove()


# -- measuring a setting ------------------------------------------------------------------------------
@dataclass
class _Eval:
    """The prompts of a steering run, encoded once: (name, ids, target id or None, item) per group."""
    groups: dict
    tokens: dict[str, int]
    scorer: object

    @classmethod
    def build(cls, session, ps: PromptSet, tokens: list[str]):
        tok = session.tokenizer
        groups = {}
        for name, items in (("target", ps.items), ("heldout", ps.heldout), ("control", ps.control)):
            exs = prompt_examples(session, [i.prompt for i in items], ps.chat)
            groups[name] = [(ex, token_id(tok, i.target) if i.target else None, i) for ex, i in zip(exs, items)]
        return cls(groups, {t: token_id(tok, t, "steer.tokens entry") for t in tokens}, ps.scorer)


@torch.no_grad()
def _probs(session, ev: _Eval) -> dict:
    """Mean target probability per group and mean probability of each chosen token (on target+heldout)."""
    out, chosen = {}, {t: [] for t in ev.tokens}
    for name, rows in ev.groups.items():
        ps = []
        for ex, target, _item in rows:
            with session.precision():
                p = session.model(input_ids=ex.input_ids[None].to(session.device)).logits[0, -1].float().softmax(-1)
            if target is not None:
                ps.append(float(p[target]))
            if name != "control":
                for t, i in ev.tokens.items():
                    chosen[t].append(float(p[i]))
        out[f"{name}_prob"] = sum(ps) / len(ps) if ps else None
    out["tokens"] = {t: (sum(v) / len(v) if v else None) for t, v in chosen.items()}
    return out


@torch.no_grad()
def cross_entropy(session, prompt_ids: torch.Tensor, new_ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL (nats) of `new_ids` after `prompt_ids` under the model in the current scope, and its length."""
    if len(new_ids) == 0:
        return 0.0, 0
    full = torch.cat([prompt_ids, new_ids])[None].to(session.device)
    with session.precision():
        logits = session.model(input_ids=full).logits[0, len(prompt_ids) - 1:-1].float()
    return float(F.cross_entropy(logits, new_ids.to(logits.device), reduction="sum")), len(new_ids)


def _measure(session, ev: _Eval, scope, max_new_tokens: int | None) -> dict:
    """Probabilities (and, with max_new_tokens, generations and their quality) inside `scope()`."""
    with session.adapter.disabled():
        with scope():
            row = _probs(session, ev)
            if max_new_tokens is None:
                return row
            gen_rows = ev.groups["target"] + ev.groups["heldout"]
            new = generate_ids(session, [ex for ex, _, _ in gen_rows], max_new_tokens)
        nll = n = 0
        gens = []
        for (ex, _t, item), ids in zip(gen_rows, new):
            a, b = cross_entropy(session, ex.prompt_ids, ids)         # the unmodified model
            nll, n = nll + a, n + b
            text = session.tokenizer.decode(ids, skip_special_tokens=True)
            score = ev.scorer(text) if ev.scorer is not None else (
                float(text.lstrip().startswith(item.target.strip())) if item.target else None)
            gens.append({"prompt": item.prompt, "text": text, "score": score, "ce": a / b if b else None,
                         "degeneracy": degeneracy(text)})
    scores = [g["score"] for g in gens if g["score"] is not None]
    row.update(score=sum(scores) / len(scores) if scores else None, ce=nll / n if n else None,
               degeneracy=sum(g["degeneracy"] for g in gens) / len(gens) if gens else None, generations=gens)
    return row


def _changes(row: dict, base: dict) -> dict:
    for k in ("target_prob", "heldout_prob", "control_prob"):
        b = base.get(k)
        if row.get(k) is not None and b:
            row[k.replace("_prob", "_change")] = row[k] / b - 1
    return row


def _mean_rows(rows: list[dict]) -> dict:
    keys = ("target_prob", "heldout_prob", "control_prob")
    return {k: (sum(r[k] for r in rows) / len(rows) if rows and rows[0].get(k) is not None else None) for k in keys}


# -- the command --------------------------------------------------------------------------------------
def steer(session, source=None, out_dir: str | Path | None = None, prompts: PromptSet | str | None = None,
          tracker=None, **overrides) -> dict:
    """Sweep `steer.multipliers` over a circuit / unit set / chain round (`source`), and CAA strengths when
    `steer.caa`; returns the result (and with `out_dir` writes steer.json and steer.png)."""
    ccfg, scfg = options(session.cfg, "circuit"), options(session.cfg, "steer", overrides)
    check_fresh(out_dir, "steer")
    ps = prompts if isinstance(prompts, PromptSet) else load_prompt_set(prompts or ccfg.prompts, ccfg.chat, session)
    basis = session.basis
    circuit = None
    if source is not None:
        circuit = source if isinstance(source, Circuit) else load_source(source, basis, scfg.units, scfg.round)
        if scfg.top is not None:
            keep = set(circuit.units()[:scfg.top])
            circuit = circuit.subset([(k, v) for k, v in circuit.neurons.items() if Unit(k[0], k[2]) in keep])
        basis.check(circuit.units(), "steered unit")
        if not circuit.neurons:
            raise UserError(f"{source} holds no units to steer")
    elif not scfg.caa:
        raise UserError("steer needs a circuit, unit set or chain folder (crabsweep steer <path>) or steer.caa=true")
    suppress = basis.check(load_source(scfg.suppress, basis, "suppressed").units(), "suppressed unit") \
        if scfg.suppress else []
    ev = _Eval.build(session, ps, scfg.tokens)
    if not any(ev.groups.values()):
        raise UserError(f"prompt set '{ps.name}' has no prompts to steer on")
    n_new = scfg.max_new_tokens
    with_s = lambda: session.intervene(*([session.mask(suppress)] if suppress else []))  # noqa: E731
    base = _measure(session, ev, with_s, n_new)
    result = {"prompt_set": ps.name, "positions": scfg.positions, "suppressed": len(suppress), "baseline": base,
              "rows": [], "caa": None, "model": session.loaded.fingerprint}
    if circuit is not None:
        twins = [random_twin(circuit, basis.sizes, seed, suppress) for seed in range(scfg.random_controls)]
        result.update(units=len(circuit.units()), entries=len(circuit), circuit=circuit.meta)
        for m in scfg.multipliers:
            scope = lambda c=circuit, m=m: session.intervene(*steering(session, c, m, scfg.positions, suppress))  # noqa: E731
            row = _changes({"method": "units", "value": m, **_measure(session, ev, scope, n_new)}, base)
            rnd = [_measure(session, ev, lambda c=t, m=m: session.intervene(*steering(session, c, m, scfg.positions,
                                                                                         suppress)), None)
                   for t in twins]
            row["random"] = _changes(_mean_rows(rnd), base) if rnd else None
            result["rows"].append(row)
            log.info("m=%g: target p %.4f (%+.1f%%), control %+.1f%%, ce %.3f", m, row["target_prob"] or 0,
                     100 * row.get("target_change", 0), 100 * row.get("control_change", 0), row["ce"] or 0)
    if scfg.caa:
        caa = CAA(session, ps.positive, ps.negative, scfg.caa_layer, ps.chat)
        result["caa"] = {"layer": caa.layer, "norm": float(caa.vector.norm()), "rows": []}
        for a in scfg.caa_alphas:
            @contextmanager
            def scope(a=a):
                with with_s(), caa.added(a):
                    yield
            result["caa"]["rows"].append(_changes({"method": "caa", "value": a, **_measure(session, ev, scope, n_new)},
                                                  base))
    if out_dir is not None:
        from .report import finish_steer
        finish_steer(session, result, Path(out_dir), tracker)
    return result
