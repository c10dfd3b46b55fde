"""`crabsweep <command> [group=option key=value …]`.

Commands:
  round      one Crab Step round (train with attribution under `round.suppress`), records in the run dir
  chain      rounds 0..N: each adds the previous round's top-K recruits to the suppressed set; resumable
  reproduce  `crabsweep reproduce <run dir> [out dir]`: re-run a chain from its saved config and compare
  sweep      Optuna over whole chains (trials = chains, rounds = intermediate values), W&B per chain
  report     `crabsweep report <study dir>`: the trials as a table, plots, the optuna-dashboard command
  ensemble   `crabsweep ensemble <chain dir> [ensemble.key=value …]`: combine round adapters; study weights

Any problem in the user's input is reported as one line on stderr with exit code 2.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import UserError

log = logging.getLogger("crabsweep")
USAGE = ("usage: crabsweep {round,chain,sweep} [group=option key=value ...] | "
         "crabsweep reproduce <run dir> [out dir] | crabsweep report <study dir> | "
         "crabsweep ensemble <chain dir> [overrides]")


def setup_logging(run_dir: Path | None) -> None:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", message=".*generation flags.*")
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger("crabsweep")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "crabsweep.log")
        file.setFormatter(fmt)
        root.addHandler(file)


def cmd_round(overrides: list[str]) -> int:
    from .config import compose_config, save_config
    from .loop.round import run_round, save_round
    from .core.session import Session
    from .core.basis import unit_from_json

    cfg, run_dir = compose_config("round", overrides)
    with _run_dir(run_dir):
        setup_logging(run_dir)
        save_config(cfg, overrides, run_dir)
        session = Session(cfg)
        suppressed = [unit_from_json(u) for u in cfg.round.suppress]
        session.space.check(suppressed, "round.suppress unit")
        result = run_round(session, suppressed, index=0)
        out = save_round(result, session, run_dir / "round_0")
    _print_round(result, out)
    return 0


def cmd_chain(overrides: list[str]) -> int:
    import time

    from omegaconf import OmegaConf

    from .loop.chain import run_chain
    from .config import check_run_dir, compose_config, save_config
    from .core.session import Session
    from .track.wandb import make_tracker

    cfg, run_dir = compose_config("chain", overrides)
    check_run_dir(cfg, run_dir)
    t0 = time.perf_counter()
    with _run_dir(run_dir):
        setup_logging(run_dir)
        save_config(cfg, overrides, run_dir)
        tracker = make_tracker(cfg, name=run_dir.name, group=cfg.tracker.get("group") or "chains", job_type="chain",
                               config=OmegaConf.to_container(cfg), directory=Path(cfg.tracker.dir or run_dir),
                               adapters_from=run_dir)
        chain = run_chain(Session(cfg), run_dir, tracker=tracker)
    _print_chain(chain, run_dir, time.perf_counter() - t0)
    return 0


def cmd_sweep(overrides: list[str]) -> int:
    import time

    from .config import compose_config, save_config
    from .sweep.study import run_worker, spawn_workers, summarize

    cfg, _ = compose_config("sweep", overrides)
    study_dir = Path(cfg.sweep.dir or f"multirun/{cfg.sweep.study}")
    setup_logging(study_dir)
    t0 = time.perf_counter()
    if cfg.sweep.role == "worker":
        run_worker(cfg, overrides, study_dir)
        return 0
    save_config(cfg, overrides, study_dir)
    workers = spawn_workers(int(cfg.sweep.workers) - 1, overrides)
    try:
        run_worker(cfg, overrides, study_dir)
    finally:
        for w in workers:
            w.wait()
    summary = summarize(cfg, study_dir, time.perf_counter() - t0)
    _print_report(study_dir, summary)
    return 0


def cmd_report(args: list[str]) -> int:
    if len(args) != 1:
        raise UserError("report takes one study folder: crabsweep report multirun/<study>")
    setup_logging(None)
    _print_report(Path(args[0]), None)
    return 0


def cmd_ensemble(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from .config import compose_config
    from .loop.ensemble import Ensembler, study_weights
    from .io import read_json
    from .track.wandb import make_tracker

    if not args or "=" in args[0]:
        raise UserError("ensemble takes a chain folder first: crabsweep ensemble <chain dir> [ensemble.key=value ...]")
    chain_dir, overrides = Path(args[0]), args[1:]
    if not chain_dir.is_dir():
        raise UserError(f"chain folder '{chain_dir}' does not exist; pass the run dir of a `crabsweep chain`")
    cfg, _ = compose_config("ensemble", overrides)
    e = cfg.ensemble
    ens = Ensembler(chain_dir, e)                                  # validates rounds, suppression, combination
    weights = ens.check_weights(e.weights if e.weights is not None else [1.0] * len(ens.rounds))
    setup_logging(chain_dir / "ensemble")
    ens.load()
    console = Console(width=max(Console().width, 120))
    chain = chain_dir / "chain.json"
    group = (read_json(chain)["config"].get("group") if chain.exists() else None) or "chains"
    tracker = make_tracker(cfg, name=f"{chain_dir.name}-ensemble", group=group, job_type="ensemble",
                           config=OmegaConf.to_container(e), directory=Path(cfg.tracker.dir or chain_dir / "ensemble"))
    if e.study:
        summary = study_weights(ens, tracker)
        tracker.finish(None)
        best = summary["best"]
        console.print(f"best of {summary['evaluations']} evaluations ({best['kind']}): weights {best['weights']}; "
                      f"held-out loss {best['heldout_loss']:.4f}, task score {best['task_score']:.2f}, "
                      f"degeneracy {best['degeneracy']:.3f}", markup=False)
        console.print("single rounds' " + e.objective.metric + ": " + ", ".join(
            f"round {r}: {v:.4f}" for r, v in summary["single_rounds"].items()), markup=False)
        weights = [best["weights"][str(r)] for r in ens.rounds]
    else:
        result = ens.evaluate(weights)
        tracker.log_evaluation({"kind": "weights", **result}, 0)
        tracker.finish(None)
        console.print(f"{e.combination} ensemble of rounds {ens.rounds} with weights {weights}: held-out loss "
                      f"{result['heldout_loss']:.4f}, task score {result['task_score']:.2f}, degeneracy "
                      f"{result['degeneracy']:.3f}", markup=False)
        console.print(f"generation: {result['texts'][0]}", markup=False)
    if e.save:
        console.print(f"saved the ensemble as a PEFT adapter: {ens.save(weights, e.save)}", markup=False)
    return 0


def _print_report(study_dir: Path, summary: dict | None) -> None:
    from .track.report import dashboard_command, write_report

    rep = write_report(study_dir)
    console = Console(width=max(Console().width, 150))
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


def cmd_reproduce(args: list[str]) -> int:
    from .loop.reproduce import reproduce

    if not 1 <= len(args) <= 2:
        raise UserError("reproduce takes a run dir and optionally an output dir: crabsweep reproduce <run dir> [out]")
    setup_logging(None)
    report = reproduce(*args)
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


def _print_chain(chain: dict, run_dir: Path, seconds: float) -> None:
    console = Console(width=max(Console().width, 150))
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


def _print_round(result, out: Path) -> None:
    console = Console()
    table = Table(title=f"top recruits (round {result.index}, |S|={len(result.suppressed)})")
    table.add_column("rank", justify="right")
    for method in result.recruits:
        table.add_column(method)
    for i in range(max(len(v) for v in result.recruits.values())):
        cells = []
        for ranked in result.recruits.values():
            r = ranked[i] if i < len(ranked) else None
            cells.append(f"L{r['unit']['layer']}:{r['unit']['index']}  {r['score']:.4g}" if r else "")
        table.add_row(str(i + 1), *cells)
    console.print(table)
    m, t = result.metrics, result.timing
    console.print(f"loss: init {m['init_loss']:.4f} → final {m['final_loss']:.4f} (weighted "
                  f"{m['init_loss_weighted']:.4f} → {m['final_loss_weighted']:.4f}); held-out "
                  f"{_fmt(m['heldout_loss'])}; task score {_fmt(m['task_score'])}")
    console.print(f"{m['steps']} steps, {t['train_seconds']:.1f}s training ({t['tokens_per_second']:.0f} tok/s), "
                  f"{t['seconds']:.1f}s round, peak RSS {t['peak_rss_mb']:.0f} MB")
    if result.generations:
        g = result.generations[0]
        console.print(f"generation for '{g['id']}' (mask on, score {g['score']:.2f}):\n{g['text']}", markup=False)
    console.print(f"records: {out}")


def _fmt(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


class _run_dir:
    """Remove a run dir this command created if it fails on a user error (nothing half-written)."""

    def __init__(self, path: Path):
        self.path, self.existed = path, path.exists()

    def __enter__(self):
        return self.path

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, UserError) and not self.existed:
            logging.getLogger("crabsweep").handlers.clear()
            shutil.rmtree(self.path, ignore_errors=True)
        return False


COMMANDS = {"round": cmd_round, "chain": cmd_chain, "reproduce": cmd_reproduce, "sweep": cmd_sweep,
            "report": cmd_report, "ensemble": cmd_ensemble}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"crabsweep: error: unknown command '{command}'; {USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](overrides)
    except UserError as e:
        print(f"crabsweep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crabsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
