"""What a person sees in the terminal: logging routed through the progress bars, tables, help."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table


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
