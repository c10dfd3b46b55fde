"""What a person sees in the terminal: logging routed through the progress bars, tables, help."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table



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
    ours.handlers.clear()           # ours print through `stream`; they still propagate (e.g. to pytest's caplog)
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
    theirs.addFilter(lambda record: not record.name.startswith("crabsweep"))   # printed once, by `stream`
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
