"""What a person sees in the terminal: logging routed through the progress bars, tables, help."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import io


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bars (tqdm.write), never into them."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def quiet_third_parties() -> None:
    """Silence warnings and progress output a user cannot act on."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for pattern in (".*generation flags.*", ".*Position ids are not supported.*", ".*`torch_dtype` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def setup_logging(run_dir: Path | None) -> None:
    quiet_third_parties()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("crabsweep")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    stream = _TqdmHandler()
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "crabsweep.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def _console(width: int = 150) -> Console:
    return Console(width=max(Console().width, width))


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def command_help(name: str, command) -> str:
    from .config import group_options
    lines = [f"crabsweep {name} {command.path_help} [group=option key=value ...]".replace("  ", " "), "",
             command.summary, "", "config groups (group=option):"]
    lines += [f"  {g:<12} {', '.join(opts)}" for g, opts in group_options().items()]
    lines += ["", "flags (Hydra's):",
              "  --cfg job|hydra|all [--resolve] [--package P]   print the composed config and exit (nothing runs)",
              "  --info [all|config|defaults|defaults-tree|searchpath]   Hydra's information about the config",
              "  --config-dir DIR                                  add a folder of your own configs to the search path",
              "  -m, --multirun                                    run the cross product of a,b,c values" +
              ("" if command.multirun else " (not for this command)"),
              "  --shell-completion install=bash                   print the bash completion script"]
    return "\n".join(lines)


def print_round(result, out: Path) -> None:
    console = _console(100)
    table = Table(title=f"top recruits (round {result.index}, |S|={len(result.suppressed)})")
    table.add_column("rank", justify="right")
    for method in result.recruits:
        table.add_column(method)
    for i in range(max((len(v) for v in result.recruits.values()), default=0)):
        cells = []
        for ranked in result.recruits.values():
            r = ranked[i] if i < len(ranked) else None
            cells.append(f"{_unit(r['unit'])}  {r['score']:.4g}" if r else "")
        table.add_row(str(i + 1), *cells)
    console.print(table)
    m, t = result.metrics, result.timing
    console.print(f"loss: init {m['init_loss']:.4f} → final {m['final_loss']:.4f} (weighted "
                  f"{m['init_loss_weighted']:.4f} → {m['final_loss_weighted']:.4f}); held-out "
                  f"{_fmt(m['heldout_loss'])}; task score {_fmt(m['task_score'])}", markup=False)
    console.print(f"{m['steps']} steps, {t['train_seconds']:.1f}s training ({t['tokens_per_second']:.0f} tok/s), "
                  f"{t['seconds']:.1f}s round, peak RSS {t['peak_rss_mb']:.0f} MB", markup=False)
    if result.generations:
        g = result.generations[0]
        console.print(f"generation for '{g['id']}' (mask on, score {g['score']:.2f}):\n{g['text']}", markup=False)
    console.print(f"records: {out}", markup=False)


def _unit(u: dict) -> str:
    if "layer" in u:
        return f"L{u['layer']}:{u['index']}"
    return f"{u.get('dictionary', 'F')}:{u.get('feature', u.get('index'))}"


def print_chain(chain: dict, run_dir: Path, seconds: float) -> None:
    console = _console()
    k = ", ".join(f"{key}={v}" for key, v in chain["config"]["k"].items() if v is not None)
    table = Table(title=f"chain ({chain['config']['attribution']}, {k}, {chain['config']['granularity']})")
    cols = ["r", "|S|", "init", "final", "Δloss", "gap", "gap rnd", "spec", "damage", "collat", "held-out",
            "top-1", "layers", "score on/off"]
    for c in cols:
        table.add_column(c, justify="right")
    for rec in chain["rounds"]:
        m = rec["metrics"]
        table.add_row(str(rec["round"]), str(m["n_suppressed"]), *(_fmt(m.get(k), 3) for k in (
            "init_loss", "final_loss", "delta_loss", "final_gap", "final_gap_random", "specificity", "damage",
            "collateral", "heldout_loss")), _fmt(m["top1_score"], 4), str(m["layers_with_recruits"]),
            f"{_fmt(m['task_score'], 2)}/{_fmt(m['task_score_mask_off'], 2)}")
    console.print(table)
    t = chain["trajectory"]
    console.print(f"trajectory: {t['class']} — {t['reason']}", markup=False)
    if chain["stopped"]:
        console.print(f"stopped early: {chain['stopped']}", markup=False)
    console.print(f"idle units: {chain['idle']['total']} ({chain['idle']['fraction']:.1%}); "
                  f"{seconds:.0f}s; records: {run_dir}/chain.json, chain.png", markup=False)


def print_report(study_dir: Path, summary: dict | None, seconds: float | None = None) -> None:
    from .track.report import dashboard_command, write_report
    rep = write_report(study_dir)
    console = _console()
    table = Table(title=f"study {rep['meta']['study']} — objective {rep['meta']['objective']}")
    for c in rep["header"]:
        table.add_column(str(c))
    for row in rep["table"]:
        table.add_row(*map(str, row))
    console.print(table)
    if summary is not None:
        console.print(f"best trial: {summary['best_trial']}; states: {summary['states']}; round cache: "
                      f"{summary['cache']['hits']} hits / {summary['cache']['misses']} misses; "
                      f"{summary['seconds']:.0f}s", markup=False)
    console.print(f"report: {study_dir}/report.md, report.csv, {', '.join(p.name for p in rep['images'].values())}",
                  markup=False)
    console.print(f"dashboard: {dashboard_command(rep['meta'])}", markup=False)


def print_reproduce(report: dict) -> int:
    console = Console()
    if report["fingerprint_difference"]:
        console.print(f"fingerprints differ: {report['fingerprint_difference']}", markup=False)
    if report["identical"]:
        console.print(f"identical: {report['rounds']} rounds, same recruits, losses and generations "
                      f"(rerun in {report['rerun']})", markup=False)
        return 0
    console.print(f"NOT identical; first difference: {report['first_difference']} (rerun in {report['rerun']})",
                  markup=False)
    return 1


def print_ensemble(summary: dict, e) -> None:
    console = _console(120)
    if "best" in summary:
        best = summary["best"]
        console.print(f"best of {summary['evaluations']} evaluations ({best['kind']}): weights {best['weights']}; "
                      f"{summary['loss_name']} {best['heldout_loss']:.4f}, task score {best['task_score']:.2f}, "
                      f"degeneracy {best['degeneracy']:.3f}", markup=False)
        console.print("single rounds' " + e.objective.metric + ": " + ", ".join(
            f"round {r}: {v:.4f}" for r, v in summary["single_rounds"].items()), markup=False)
    else:
        r = summary["result"]
        console.print(f"{e.combination} ensemble of rounds {summary['rounds']} with weights {summary['weights']}: "
                      f"{summary['loss_name']} {r['heldout_loss']:.4f}, task score {r['task_score']:.2f}, "
                      f"degeneracy {r['degeneracy']:.3f}", markup=False)
        console.print(f"generation: {r['texts'][0]}", markup=False)
    if summary.get("saved"):
        console.print(f"saved the ensemble as a PEFT adapter: {summary['saved']}", markup=False)


# -- circuits ----------------------------------------------------------------------------------------
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
