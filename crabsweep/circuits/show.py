"""What `crabsweep discover | steer | faithfulness | edges` print (the records are written by their modules)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from .. import io
from ..console import _console, _fmt


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def print_discover(found, run_dir: Path) -> None:
    c = found.circuit
    console = _console(110)
    m = c.meta
    metric = f"; mean {m['metric']} {c.total_logit_diff:.4f}" if m["method"] == "relp" else ""
    console.print(f"{m['method']} circuit: {len(c)} entries, {len(c.units())} units ({m['granularity']}, positions "
                  f"{m['positions']}, {m['selection']['select']}){metric}; layers {m['skip_layers']} skipped"
                  + (f", {len(found.excluded)} units excluded" if found.excluded else ""), markup=False)
    table = Table(title="top entries")
    for col in ("layer", "position", "unit", "score"):
        table.add_column(col, justify="right")
    for (g, p, i), v in c.top(15):
        table.add_row(str(g), str(p), str(i), f"{v:+.4g}")
    console.print(table)
    per_layer = {g: len(v) for g, v in c.by_layer().items()}
    console.print("entries per layer: " + ", ".join(f"L{g}:{n}" for g, n in per_layer.items()), markup=False)
    console.print(f"records: {run_dir}/circuit.json (neural-steering format), units.json", markup=False)


def print_steer(result: dict, run_dir: Path) -> None:
    console = _console(150)
    b = result["baseline"]
    console.print(f"no steering: target p {_fmt(b['target_prob'])}, held-out {_fmt(b['heldout_prob'])}, control "
                  f"{_fmt(b['control_prob'])}, score {_fmt(b['score'], 2)}, CE {_fmt(b['ce'], 3)}", markup=False)
    table = Table(title=f"steering on '{result['prompt_set']}' ({result.get('units', 0)} units, positions "
                        f"{result['positions']}, {result['suppressed']} suppressed)")
    for col in ("method", "m / α", "target p", "Δ", "held-out Δ", "control Δ", "random Δ", "random ctl Δ", "score",
                "CE", "3-gram rep", "first generation"):
        table.add_column(col, justify="left" if col == "first generation" else "right")
    for r in result["rows"] + ((result.get("caa") or {}).get("rows") or []):
        rnd = r.get("random") or {}
        text = r["generations"][0]["text"] if r["generations"] else ""
        table.add_row(r["method"], f"{r['value']:g}", _fmt(r["target_prob"]), _pct(r.get("target_change")),
                      _pct(r.get("heldout_change")), _pct(r.get("control_change")), _pct(rnd.get("target_change")),
                      _pct(rnd.get("control_change")), _fmt(r["score"], 2), _fmt(r["ce"], 3), _fmt(r["degeneracy"], 3),
                      repr(text[:48]))
    console.print(table)
    console.print(f"records: {run_dir}/steer.json, steer.png", markup=False)


def print_faithfulness(result: dict, run_dir: Path) -> None:
    console = _console(110)
    console.print(f"F(M) = {result['f_model']:.4f}, F(∅) = {result['f_empty']:.4f} ({result['means']} means, "
                  f"{result['patch']}; {result['n_ranked']} ranked units of {result['n_model']})", markup=False)
    table = Table(title=f"faithfulness on '{result['prompt_set']}'")
    for col in ("% attributed", "units", "% model", "F(C)", "F(M\\C)", "faithfulness", "completeness"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(f"{r['percent']:g}", str(r["n_units"]), f"{r['percent_model']:.3f}", _fmt(r["f_circuit"], 3),
                      _fmt(r["f_complement"], 3), _fmt(r["faithfulness"], 3), _fmt(r["completeness"], 3))
    console.print(table)
    console.print(f"records: {run_dir}/faithfulness.json, faithfulness.png", markup=False)


def print_edges(graph, run_dir: Path) -> None:
    console = _console(110)
    console.print(f"{len(graph.edges)} edges into {len(graph.targets)} target entries", markup=False)
    console.print("top edges: " + "; ".join(f"L{s[0]}/{s[2]}@{s[1]} → L{t[0]}/{t[2]}@{t[1]} {w:+.3g}"
                                             for s, t, w in graph.edges[:8]), markup=False)
    console.print("layer flow: " + ", ".join(f"L{a}→L{b} {w:.3g}" for a, b, w in graph.layer_flow()[:8]), markup=False)
    data = io.read_json(run_dir / "edges.json")
    hubs = data["hubs"]["sources"][:5]
    console.print("source hubs: " + ", ".join(f"L{h['unit'][0]}/{h['unit'][1]} ({h['degree']} targets)" for h in hubs),
                  markup=False)
    console.print("bottlenecks: " + (", ".join(f"L{b['unit'][0]}/{b['unit'][1]} (in {b['in_degree']}, out "
                                               f"{b['out_degree']})" for b in data["bottlenecks"][:5]) or "none"),
                  markup=False)
    console.print("super weights: " + (", ".join(f"L{x['unit'][0]}/{x['unit'][1]} ({x['ratio']:.0f}× median)"
                                                 for x in data["super_weights"][:5]) or "none"), markup=False)
    console.print(f"records: {run_dir}/edges.json, edges.dot (dot -Tpng edges.dot > edges.png)", markup=False)
