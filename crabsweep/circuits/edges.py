"""Edges inside a circuit: how much each earlier circuit unit drives each of its top units.

    import crabsweep as cs
    graph = cs.edges(session, "runs/capitals/circuit.json", out_dir="runs/edges")   # edges.json, edges.dot
    graph.layer_flow(), graph.hubs(), graph.bottlenecks(), graph.super_weights()

For each of the circuit's `edges.targets` entries of largest |score| (a unit at its positions), in the
RelP-linearized base model (methods/relp.py; one forward per prompt, one backward per target, no weight
gradients): w(s → t) = Σ_positions a_s · ∂h_t/∂a_s for every circuit entry s in an earlier layer, h_t the
target's activation summed over its positions. It is the total effect through every path (residual,
attention, other units), signed. Edges are averaged over the circuit's prompts (positions aligned at
their ends) and kept when |w| ≥ `edges.min_relative` × the largest |w|.
Analyses (positions collapsed to units): layer flow Σ|w| per (source layer, target layer); hubs by
degree = number of distinct neighbours; bottlenecks = units whose in- and out-degree are both ≥
`bottleneck_fraction` × the largest; super weights = sources with ≥ `super_min_targets` distinct targets
whose mean |w| ≥ `super_ratio` × the median of those sources' mean |w|.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import io
from ..core.observers import Capture
from ..errors import UserError
from ..methods.relp import linearized
from .circuit import Circuit, Key, load_source
from .config import options
from .report import check_fresh
from .prompts import encode

log = logging.getLogger(__name__)


@dataclass
class Graph:
    edges: list[tuple[Key, Key, float]]          # (source, target, weight), by |weight| descending
    targets: list[Key]
    prompts: list[str] = field(default_factory=list)

    def layer_flow(self) -> list[tuple[int, int, float]]:
        flow: dict[tuple[int, int], float] = {}
        for s, t, w in self.edges:
            flow[(s[0], t[0])] = flow.get((s[0], t[0]), 0.0) + abs(w)
        return sorted(((a, b, w) for (a, b), w in flow.items()), key=lambda x: -x[2])

    def _neighbours(self):
        out: dict[tuple, set] = {}
        inn: dict[tuple, set] = {}
        weight: dict[tuple, float] = {}
        for s, t, w in self.edges:
            su, tu = (s[0], s[2]), (t[0], t[2])
            out.setdefault(su, set()).add(tu)
            inn.setdefault(tu, set()).add(su)
            weight[su] = weight.get(su, 0.0) + abs(w)
            weight[tu] = weight.get(tu, 0.0) + abs(w)
        return out, inn, weight

    def hubs(self, k: int = 10) -> dict:
        out, inn, weight = self._neighbours()
        rank = lambda d: [{"unit": list(u), "degree": len(v), "weight": weight[u]}  # noqa: E731
                          for u, v in sorted(d.items(), key=lambda kv: (-len(kv[1]), -weight[kv[0]]))[:k]]
        return {"sources": rank(out), "targets": rank(inn)}

    def bottlenecks(self, fraction: float = 0.2) -> list[dict]:
        out, inn, _ = self._neighbours()
        if not out or not inn:
            return []
        lo_out, lo_in = fraction * max(map(len, out.values())), fraction * max(map(len, inn.values()))
        both = [(u, len(inn[u]), len(out[u])) for u in out if u in inn and len(out[u]) >= lo_out and len(inn[u]) >= lo_in]
        return [{"unit": list(u), "in_degree": i, "out_degree": o} for u, i, o in sorted(both, key=lambda x: -min(x[1], x[2]))]

    def super_weights(self, ratio: float = 10.0, min_targets: int = 5) -> list[dict]:
        by_source: dict[tuple, list[tuple[tuple, float]]] = {}
        for s, t, w in self.edges:
            by_source.setdefault((s[0], s[2]), []).append(((t[0], t[2]), w))
        stats = {u: (sum(abs(w) for _, w in es) / len(es), sum(w for _, w in es) / len(es), len({t for t, _ in es}))
                 for u, es in by_source.items() if len({t for t, _ in es}) >= min_targets}
        if not stats:
            return []
        median = max(statistics.median(v[0] for v in stats.values()), 1e-8)
        flagged = [{"unit": list(u), "mean_abs": a, "mean": m, "targets": n, "ratio": a / median}
                   for u, (a, m, n) in stats.items() if a / median >= ratio]
        return sorted(flagged, key=lambda x: -x["ratio"])

    def to_json(self, ecfg) -> dict:
        return {"n_edges": len(self.edges),
                "edges": [{"source": list(s), "target": list(t), "weight": w} for s, t, w in self.edges],
                "targets": [list(t) for t in self.targets], "prompts": self.prompts,
                "layer_flow": [{"source_layer": a, "target_layer": b, "weight": w} for a, b, w in self.layer_flow()],
                "hubs": self.hubs(), "bottlenecks": self.bottlenecks(ecfg.bottleneck_fraction),
                "super_weights": self.super_weights(ecfg.super_ratio, ecfg.super_min_targets)}

    def to_dot(self, top: int = 50, fraction: float = 0.2) -> str:
        """Graphviz DOT of the `top` edges by |w| (the reference's layout: one cluster per layer)."""
        shown = self.edges[:top]
        if not shown:
            return "digraph circuit {\n}\n"
        wmax = max(abs(w) for _, _, w in shown) or 1.0
        node_w: dict[tuple, float] = {}
        for s, t, w in shown:
            for u in ((s[0], s[2]), (t[0], t[2])):
                node_w[u] = max(node_w.get(u, 0.0), abs(w))
        necks = {tuple(b["unit"]) for b in self.bottlenecks(fraction)}
        lines = ["digraph circuit {", "  rankdir=TB;", '  bgcolor="#1a1a2e";',
                 '  node [style=filled, fontcolor=white, fontname="Helvetica"];', '  edge [color="#555555"];', ""]
        for layer in sorted({u[0] for u in node_w}):
            lines += [f"  subgraph cluster_L{layer} {{", f'    label="Layer {layer}";',
                      '    style=dashed; color="#444444"; fontcolor="#888888";']
            for (l, n), w in sorted(node_w.items()):
                if l != layer:
                    continue
                size = f"{0.3 + 0.7 * w / wmax:.2f}"
                if (l, n) in necks:
                    lines.append(f'    L{l}_N{n} [label="L{l}/N{n}\\nBOTTLENECK", shape=doubleoctagon, '
                                 f'fillcolor="#ff6b6b", width={size}];')
                else:
                    lines.append(f'    L{l}_N{n} [label="L{l}/N{n}", shape=ellipse, fillcolor="#4ecdc4", width={size}];')
            lines += ["  }", ""]
        for s, t, w in shown:
            alpha = f"{int(80 + 175 * abs(w) / wmax):02x}"
            color = ("#e74c3c" if w > 0 else "#3498db") + alpha
            lines.append(f'  L{s[0]}_N{s[2]} -> L{t[0]}_N{t[2]} [penwidth={0.5 + 4.5 * abs(w) / wmax:.1f}, '
                         f'color="{color}", tooltip="w={w:.4f}"];')
        return "\n".join(lines + ["}"]) + "\n"


def positions_in(circuit: Circuit, position: int, t: int) -> list[int]:
    """Absolute positions of an entry in a t-token prompt."""
    p = circuit.steer_position(position)
    if p is None:
        return list(range(t))
    p = t + p if p < 0 else p
    return [p] if 0 <= p < t else []


def edge_weights(session, circuit: Circuit, ids: torch.Tensor, targets: list[Key]) -> dict[tuple[Key, Key], float]:
    """w(s → t) for one prompt (every circuit entry s in a layer before t's)."""
    basis, model, t_len = session.basis, session.model, len(ids)
    entries = list(circuit.neurons)
    cap = Capture(graph=True)
    out: dict[tuple[Key, Key], float] = {}

    def unit_sum(x, g, i, pos):
        return basis.view(x[0, pos], g)[:, i, :].sum()
    with session.adapter.disabled(), linearized(model, session.loaded.arch), session.observe(cap), \
            torch.enable_grad():
        with session.precision():
            model(input_ids=ids[None].to(session.device))
        for tgt in targets:
            pos_t = positions_in(circuit, tgt[1], t_len)
            sources = [s for s in entries if s[0] < tgt[0] and positions_in(circuit, s[1], t_len)]
            if not pos_t or not sources or tgt[0] not in cap.acts:
                continue
            groups = sorted({s[0] for s in sources if s[0] in cap.acts})
            value = unit_sum(cap.acts[tgt[0]], tgt[0], tgt[2], pos_t)
            grads = dict(zip(groups, torch.autograd.grad(value, [cap.acts[g] for g in groups], retain_graph=True,
                                                         allow_unused=True)))
            for s in sources:
                g = grads.get(s[0])
                if g is not None:
                    prod = cap.acts[s[0]].detach().float() * g.float()
                    out[(s, tgt)] = float(unit_sum(prod, s[0], s[2], positions_in(circuit, s[1], t_len)))
    return out


def _prompts(session, circuit: Circuit, ccfg) -> tuple[list[torch.Tensor], list[str]]:
    meta = circuit.meta
    texts = meta.get("prompts") or meta.get("positive")
    if texts:
        return encode(session, list(texts), bool(meta.get("chat", False))), list(texts)
    if circuit.prompt and not circuit.prompt.startswith("["):       # a reference file: the formatted prompt
        ids = torch.tensor(session.tokenizer(circuit.prompt)["input_ids"], dtype=torch.long)
        return [ids], [circuit.prompt]
    if circuit.positions == "absolute":
        raise UserError("this circuit stores no prompt for its absolute positions; discover it with crabsweep "
                        "(which records its prompts) or pass a reference circuit from a single prompt")
    from .prompts import load_prompt_set
    ps = load_prompt_set(ccfg.prompts, ccfg.chat, session)
    texts = [i.prompt for i in ps.items] or ps.positive
    if not texts:
        raise UserError(f"prompt set '{ps.name}' has no prompts to compute edges on; fix circuit.prompts")
    return encode(session, texts, ps.chat), texts


def edges(session, source, out_dir: str | Path | None = None, **overrides) -> Graph:
    """The edge graph of a circuit (config section `edges`); with `out_dir`, write edges.json and edges.dot."""
    ccfg, ecfg = options(session.cfg, "circuit"), options(session.cfg, "edges", overrides)
    check_fresh(out_dir, "edges")
    circuit = source if isinstance(source, Circuit) else load_source(source, session.basis)
    session.basis.check(circuit.units(), "circuit unit")
    if session.basis.name == "moe_expert":
        raise UserError("edges need per-token features; suppression=moe_expert has none")
    targets = [k for k, _ in circuit.top(ecfg.targets)]
    prompts, texts = _prompts(session, circuit, ccfg)
    total: dict[tuple[Key, Key], float] = {}
    for ids in prompts:
        for key, w in edge_weights(session, circuit, ids, targets).items():
            total[key] = total.get(key, 0.0) + w / len(prompts)
    wmax = max((abs(w) for w in total.values()), default=0.0)
    kept = sorted(((s, t, w) for (s, t), w in total.items() if w != 0.0 and abs(w) >= ecfg.min_relative * wmax),
                  key=lambda e: -abs(e[2]))
    graph = Graph(kept, targets, texts)
    log.info("%d edges among %d entries (%d targets, %d prompts)", len(kept), len(circuit), len(targets), len(prompts))
    if out_dir is not None:
        out = Path(out_dir)
        io.write_json(out / "edges.json", graph.to_json(ecfg))
        io.write_text(out / "edges.dot", graph.to_dot(ecfg.dot_edges, ecfg.bottleneck_fraction))
    return graph
