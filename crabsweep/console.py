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
    """Log lines printed above the progress bars (tqdm.write clears the bars, prints, redraws them), never
    into them. Without a live bar it is a plain stderr handler."""

    def emit(self, record):
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001
            self.handleError(record)


def quiet_third_parties() -> None:
    """Silence warnings and progress output a user cannot act on (they are not about the user's config)."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for pattern in (".*generation flags.*", ".*Position ids are not supported.*", ".*`torch_dtype` is deprecated.*",
                    ".*TRANSFORMERS_CACHE.*", ".*`resume_download`.*", ".*pkg_resources is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()          # its warnings reach ours through propagation
    optuna.logging.enable_propagation()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name in ("wandb", "urllib3", "filelock", "matplotlib", "PIL", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_logging(run_dir: Path | None) -> None:
    """crabsweep's INFO lines and every other library's warnings (and Python warnings) through one handler
    that prints above the progress bars; crabsweep's lines also into `<run_dir>/crabsweep.log`."""
    quiet_third_parties()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    ours = logging.getLogger("crabsweep")
    ours.setLevel(logging.INFO)
    ours.handlers.clear()
    ours.propagate = False
    from .redact import RedactingFilter
    stream = _TqdmHandler()
    stream.setFormatter(fmt)
    stream.addFilter(RedactingFilter())
    ours.addHandler(stream)
    top = logging.getLogger()
    for h in [h for h in top.handlers if isinstance(h, _TqdmHandler)]:
        top.removeHandler(h)
    theirs = _TqdmHandler()
    theirs.setLevel(logging.WARNING)
    theirs.setFormatter(fmt)
    theirs.addFilter(RedactingFilter())
    top.addHandler(theirs)
    logging.captureWarnings(True)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "crabsweep.log")
        file.setFormatter(fmt)
        file.addFilter(RedactingFilter())
        ours.addHandler(file)


def _console(width: int = 150) -> Console:
    """The terminal's width on a terminal (rich fits tables to it); at least `width` when piped to a file."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=max(plain.width, width))


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


SHORT = {"n_suppressed": "|S|", "init_loss": "init", "final_loss": "final", "delta_loss": "Δloss", "final_gap": "gap",
         "final_gap_random": "gap rnd", "specificity": "spec", "selectivity": "select", "behaviour_ce": "behav CE",
         "content_ce": "content CE", "collateral": "collat", "heldout_loss": "held-out", "task_score": "score",
         "task_score_mask_off": "score off", "top1_score": "top-1", "layers_with_recruits": "layers"}


def _cell(x) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def rounds_table(chain: dict, title: str, names: list[str] | None = None) -> Table:
    """One row per round with the familiar metrics that exist (records.CORE), or `names`."""
    from .track.records import CORE, metric_names
    present = metric_names(chain["rounds"])
    names = names or [k for k in CORE if k in present] or present
    table = Table(title=title)
    for c in ["r", *(SHORT.get(k, k) for k in names)]:
        table.add_column(c, justify="right")
    for rec in chain["rounds"]:
        table.add_row(str(rec["round"]), *(_cell(rec["metrics"].get(k)) for k in names))
    return table


def _chain_title(chain: dict, name: str = "chain") -> str:
    c = chain["config"]
    k = ", ".join(f"{key}={v}" for key, v in c["k"].items() if v is not None)
    return f"{name} ({c['attribution']}, {k}, {c['granularity']})"


def print_chain(chain: dict, run_dir: Path, seconds: float | None) -> None:
    console = _console()
    console.print(rounds_table(chain, _chain_title(chain, f"chain {Path(run_dir).name}")))
    t = chain["trajectory"]
    console.print(f"trajectory: {t['class']} — {t['reason']}", markup=False, highlight=False)
    if chain["stopped"]:
        console.print(f"stopped early: {chain['stopped']}", markup=False, highlight=False)
    took = f"{seconds:.0f}s; " if seconds is not None else ""
    console.print(f"idle units: {chain['idle']['total']} ({chain['idle']['fraction']:.1%}); "
                  f"{took}records: {run_dir}/chain.json, chain.png", markup=False, highlight=False)


def print_recruits(chain: dict) -> None:
    from .track.records import unit_label
    table = Table(title="selected units per round (best first, with their scores)")
    table.add_column("r", justify="right")
    table.add_column("|S| before", justify="right")
    table.add_column("method")
    table.add_column("selected units", overflow="fold")
    for rec in chain["rounds"]:
        rc = rec["recruits"]
        units = "  ".join(f"{unit_label(x['unit'])} {x['score']:.3g}" for x in rc["selected"])
        table.add_row(str(rec["round"]), str(len(rec["suppressed"])), rc["method"], units or "—")
    _console().print(table)


def print_show(directory: Path) -> None:
    """`crabsweep show`: a chain (per-round table, trajectory, recruits) or a study (trial table)."""
    from .api import Chain, Study
    if (directory / "sweep.json").exists():
        from .track.report import display_frame
        study = Study.load(directory)
        frame = study.trials
        console = _console()
        console.print(frame_table(display_frame(frame, study.meta), f"study {study.meta['study']} — value = last "
                                  f"round's {study.meta['objective']['metric']} ({study.meta['objective']['direction']})"))
        console.print(f"{len(frame)} trials; a chain: crabsweep show {directory}/trial_<n>; plots and report.html: "
                      f"crabsweep report {directory}", markup=False, highlight=False)
        return
    chain = Chain.load(directory)
    print_chain(chain.record, directory, None)
    print_recruits(chain.record)


def frame_table(frame, title: str) -> Table:
    table = Table(title=title)
    for c in frame.columns:
        table.add_column(str(c), justify="right", overflow="fold")
    for row in frame.astype(object).itertuples(index=False):
        table.add_row(*(_cell(None if _isna(v) else v) for v in row))
    return table


def _isna(v) -> bool:
    import pandas as pd
    return not isinstance(v, (list, dict, tuple)) and bool(pd.isna(v))


def print_compare(comp) -> None:
    """`crabsweep compare`: metrics side by side, trajectory classes, recruit overlap (and a study's matrices)."""
    from .track.records import CORE
    console = _console()
    m = comp.metrics
    core = [k for k in CORE if k in m.index.get_level_values("metric")]
    shown = m[m.index.get_level_values("metric").isin(core)].reset_index()
    if len(comp.chains) <= 6:
        console.print(frame_table(shown, "per-round metrics side by side"))
    console.print(frame_table(comp.trajectories.reset_index()[["chain", "class", "rounds", "reason"]],
                              "trajectory classes"))
    if comp.matrices:
        for name, mat in comp.matrices.items():
            console.print(frame_table(mat.reset_index(names="chain"), f"{comp.study}: {name}"))
        return
    console.print(frame_table(comp.overlap, "recruit overlap per round (Jaccard of the selected units and of S "
                                            "after the round; rank correlation on the shared units)"))


def print_report(study_dir: Path, summary: dict | None, seconds: float | None = None) -> None:
    from .track.report import dashboard_command, write_report
    rep = write_report(study_dir, write=summary is None)     # after a sweep, its summary just wrote it
    console = _console()
    meta = rep["meta"]
    console.print(frame_table(rep["display"], f"study {meta['study']} — value = last round's "
                                              f"{meta['objective']['metric']} ({meta['objective']['direction']})"))
    if summary is not None:
        best = summary["best_trial"]
        best = (f"best trial {best['number']}: {meta['objective']['metric']} {best['value']:.4g} ("
                + ", ".join(f"{k}={v}" for k, v in best["params"].items()) + ")") if best else "no completed trial"
        states = ", ".join(f"{n} {k.lower()}" for k, n in summary["states"].items())
        console.print(f"{best}; trials: {states}; round cache: {summary['cache']['hits']} hits / "
                      f"{summary['cache']['misses']} misses; {summary['seconds']:.0f}s", markup=False, highlight=False)
    console.print(f"report: {', '.join(str(p) for p in rep['files'])}; plots: "
                  f"{', '.join(p.name for p in rep['images'].values())}", markup=False, highlight=False)
    console.print(f"dashboard: {dashboard_command(meta)}", markup=False, highlight=False)


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
                      f"{summary['loss_name']} {best[summary['loss_name']]:.4f}, task score {best['task_score']:.2f}, "
                      f"degeneracy {best['degeneracy']:.3f}", markup=False)
        console.print("single rounds' " + summary["objective"]["metric"] + ": " + ", ".join(
            f"round {r}: {v:.4f}" for r, v in summary["single_rounds"].items()), markup=False)
    else:
        r = summary["result"]
        console.print(f"{e.combination} ensemble of rounds {summary['rounds']} with weights {summary['weights']}: "
                      f"{summary['loss_name']} {r[summary['loss_name']]:.4f}, task score {r['task_score']:.2f}, "
                      f"degeneracy {r['degeneracy']:.3f}", markup=False)
        console.print(f"generation: {r['texts'][0]}", markup=False)
    if summary.get("dir"):
        console.print(f"records: {summary['dir']}", markup=False)
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


# -- dictionaries ------------------------------------------------------------------------------------
def print_dictionary_info(dic) -> None:
    console = _console(100)
    table = Table(title=f"dictionary {dic.name}")
    table.add_column("key")
    table.add_column("value")
    for k, v in (("source", dic.source), ("kind", "SAE" if dic.n_layers == 1 else f"crosscoder over {dic.n_layers} sites"),
                 ("hooks", ", ".join(s.hook_name for s in dic.sites)), ("width d", dic.d), ("features", dic.n_features),
                 ("activation", dic.activation + (f" (k={dic.k})" if dic.k else "")),
                 ("apply_b_dec_to_input", dic.apply_b_dec_to_input)):
        table.add_row(k, str(v))
    console.print(table)


def print_dictionary_training(folder: Path, rec: dict) -> None:
    console = _console(100)
    held = rec["heldout"]
    console.print(f"{rec['kind']} at {', '.join(rec['hooks'])}: {rec['width']} features, k={rec['k']}, lr {rec['lr']:.3g}; "
                  f"{rec['corpus']['train']['tokens']} train / {rec['corpus']['heldout']['tokens']} held-out tokens",
                  markup=False)
    console.print(f"held-out FVU {held['fvu']:.4f} (train {rec['train']['fvu']:.4f}), L0 {held['l0']:.1f}, "
                  f"dead features {100 * rec['dead_fraction']:.1f}%", markup=False)
    table = Table(title="cross-entropy with the layer spliced (held-out, every token but the first)")
    for c in ("hook", "CE clean", "CE spliced", "CE zero", "ΔCE", "CE recovered"):
        table.add_column(c, justify="right")
    for c in rec["ce"]:
        table.add_row(c["hook"], _fmt(c["ce_clean"], 3), _fmt(c["ce_spliced"], 3), _fmt(c["ce_zero"], 3),
                      _fmt(c["delta_ce"], 3), _fmt(c["ce_recovered"], 3))
    console.print(table)
    s = rec["seconds"]
    console.print(f"{sum(s.values()):.0f}s (corpus {s['corpus']:.0f}s, activations {s['activations']:.0f}s, "
                  f"training {s['training']:.0f}s, evaluation {s['evaluation']:.0f}s); saved {folder}", markup=False)


def print_compare(rec: dict, run_dir: Path) -> None:
    console = _console(110)
    table = Table(title=f"ablating feature {rec['feature']} of {rec['dictionary']} — CE under the clean model "
                        f"(target {_fmt(rec['reference']['clean_prompt_ce'], 3)})")
    for c in ("method", "layer", "scale / lr", "CE", "± sem", "residual", "off"):
        table.add_column(c, justify="right")
    for r in rec["rows"]:
        knob = r.get("scale", r.get("lr"))
        table.add_row(r["method"], "" if r.get("layer") is None else str(r["layer"]), "" if knob is None else f"{knob:g}",
                      _fmt(r["ce"], 3), _fmt(r["ce_sem"], 3), _fmt(r["residual"], 3), _fmt(r["off"], 2))
    console.print(table)
    console.print(f"records: {run_dir / 'compare.json'}, plot: {run_dir / 'compare.png'}", markup=False)
