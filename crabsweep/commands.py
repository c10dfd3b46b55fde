"""The commands: each parses its paths and overrides, handles Hydra's flags, and calls the library.

A command is a `Command(summary, fn, paths=…)`; `fn(ctx)` gets a `Context` with the composed config,
the run dir and the paths, and returns the exit code. Printing lives in console.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import console
from .errors import UserError

log = logging.getLogger("crabsweep")


@dataclass
class Context:
    name: str
    overrides: list[str]
    paths: list[Path]
    config_dir: str | None
    cfg: object = None
    run_dir: Path | None = None
    sessions: dict = field(default_factory=dict)     # multirun: one model per structure across jobs

    def compose(self, command: str | None = None, overrides: list[str] | None = None):
        from .config import compose_config
        self.cfg, self.run_dir = compose_config(command or self.name, self.overrides if overrides is None else overrides,
                                                config_dir=self.config_dir)
        return self.cfg

    def session(self):
        from .core.session import Session
        key = Session.structure_key(self.cfg)
        if key not in self.sessions:
            self.sessions.clear()
            self.sessions[key] = Session(self.cfg)
        session = self.sessions[key]
        session.cfg, session.overrides = self.cfg, self.overrides
        return session


@dataclass
class Command:
    summary: str
    fn: Callable[[Context], int]
    paths: tuple[int, int] = (0, 0)          # how many leading path arguments (min, max)
    path_help: str = ""
    multirun: bool = False                   # -m runs the cross product of the overrides

    def run(self, name: str, argv: list[str]) -> int:
        args = _parser(name).parse_args(argv)
        words = list(args.overrides)
        n_paths = 0
        while n_paths < len(words) and n_paths < self.paths[1] and "=" not in words[n_paths]:
            n_paths += 1
        paths, overrides = [Path(p) for p in words[:n_paths]], words[n_paths:]
        stray = [w for w in overrides if "=" not in w and not w.startswith("~")]
        if stray and not (args.help or args.shell_completion):
            raise UserError(f"{name} takes {self.path_help or 'no paths'}, not '{stray[0]}' (overrides are "
                            f"key=value): crabsweep {name} {self.path_help} [overrides]".replace("  ", " "))
        if args.help:
            print(console.command_help(name, self))
            return 0
        if args.shell_completion:
            from .config import shell_completion
            shell_completion(overrides, command=name)
            return 0
        ctx = Context(name, overrides, paths, args.config_dir)
        if args.info:
            from .config import hydra_info
            hydra_info(name, overrides, args.info, config_dir=args.config_dir)
            return 0
        if args.cfg:
            from .config import show_config
            print(show_config(name, overrides, args.cfg, resolve=args.resolve, package=args.package,
                              config_dir=args.config_dir), end="")
            return 0
        if not self.paths[0] <= len(paths) <= self.paths[1]:
            raise UserError(f"{name} takes {self.path_help}: crabsweep {name} {self.path_help} [overrides]")
        if args.multirun:
            if not self.multirun:
                raise UserError(f"{name} does not take -m; run it once per configuration (or use crabsweep sweep)")
            return _multirun(self, ctx)
        return self.fn(ctx)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message}; see crabsweep {self.prog} --help")


def _parser(name: str) -> argparse.ArgumentParser:
    from hydra._internal.utils import get_args_parser
    base = get_args_parser()
    parser = _Parser(prog=name, add_help=False, parents=[base], conflict_handler="resolve")
    return parser


def _multirun(command: Command, ctx: Context) -> int:
    """Hydra's basic sweeper: the cross product of comma-separated override values, one job at a time."""
    from .config import compose_config, expand_multirun, sweep_dir
    jobs = expand_multirun(ctx.overrides)
    for job in jobs:                      # every job's config is valid before the first one runs
        compose_config(ctx.name, job, config_dir=ctx.config_dir)
    base = sweep_dir(ctx.name, ctx.overrides, config_dir=ctx.config_dir)
    log.info("multirun: %d jobs in %s", len(jobs), base)
    codes = []
    for i, job in enumerate(jobs):
        print(f"[{i}] {' '.join(job)}", file=sys.stderr)
        sub = Context(ctx.name, [*job, f"hydra.run.dir={base / str(i)}"], ctx.paths, ctx.config_dir,
                      sessions=ctx.sessions)
        codes.append(command.fn(sub))
    return max(codes) if codes else 0


# --------------------------------------------------------------------------------------------------
def cmd_round(ctx: Context) -> int:
    from .config import save_config
    from .io import owned_run_dir
    from .loop.round import run_round, save_round
    cfg = ctx.compose()
    with owned_run_dir(ctx.run_dir) as run_dir:        # a new or empty folder: a round does not resume
        console.setup_logging(run_dir)
        save_config(cfg, ctx.overrides, run_dir)
        session = ctx.session()
        from omegaconf import OmegaConf
        suppressed = session.basis.check([session.basis.unit_from_json(OmegaConf.to_container(u))
                                          for u in cfg.round.suppress], "round.suppress unit")
        result = run_round(session, suppressed, index=0)
        out = save_round(result, session, run_dir / "round_0")
    console.print_round(result, out)
    return 0


def cmd_chain(ctx: Context) -> int:
    from .api import run_chain
    from .config import check_run_dir
    from .io import owned_run_dir
    cfg = ctx.compose()
    check_run_dir(cfg, ctx.run_dir)
    t0 = time.perf_counter()
    with owned_run_dir(ctx.run_dir, resume=True) as run_dir:
        console.setup_logging(run_dir)
        chain = run_chain(ctx.session(), run_dir)
    console.print_chain(chain.record, run_dir, time.perf_counter() - t0)
    return 0


def cmd_sweep(ctx: Context) -> int:
    from .sweep.study import run_sweep
    cfg = ctx.compose()
    t0 = time.perf_counter()
    study_dir, summary = run_sweep(cfg, ctx.overrides, config_dir=ctx.config_dir)
    if summary is not None:
        console.print_report(study_dir, summary, time.perf_counter() - t0)
    return 0


def cmd_report(ctx: Context) -> int:
    console.setup_logging(None)
    console.print_report(ctx.paths[0], None)
    return 0


def cmd_show(ctx: Context) -> int:
    console.setup_logging(None)
    console.print_show(ctx.paths[0])
    return 0


def cmd_compare(ctx: Context) -> int:
    from .api import compare
    console.setup_logging(None)
    rnd = [o for o in ctx.overrides if o.startswith("round=")]
    if len(rnd) != len(ctx.overrides) or not all(o.split("=", 1)[1].isdigit() for o in rnd):
        raise UserError(f"compare takes folders and optionally round=<r> (the round of a study's matrices), "
                        f"not {' '.join(ctx.overrides)}")
    console.print_compare(compare(*ctx.paths, round=int(rnd[-1].split("=", 1)[1]) if rnd else 0))
    return 0


def cmd_reproduce(ctx: Context) -> int:
    from .loop.reproduce import reproduce
    console.setup_logging(None)
    report = reproduce(*ctx.paths)
    return console.print_reproduce(report)


def cmd_ensemble(ctx: Context) -> int:
    from .loop.ensemble import run_ensemble
    chain_dir = ctx.paths[0]
    if not chain_dir.is_dir():
        raise UserError(f"chain folder '{chain_dir}' does not exist; pass the run dir of a `crabsweep chain`")
    cfg = ctx.compose()
    summary = run_ensemble(chain_dir, cfg)
    console.print_ensemble(summary, cfg.ensemble)
    return 0


def _circuit_run(ctx: Context, job: str, fn) -> int:
    """Compose, own the run dir, save the config, call `fn(session, run_dir, tracker)` → what to print."""
    from .api import chain_config
    from .circuits.report import check_fresh
    from .config import save_config
    from .io import owned_run_dir
    from .track.wandb import make_tracker
    cfg = ctx.compose()
    check_fresh(ctx.run_dir, job)
    with owned_run_dir(ctx.run_dir) as run_dir:
        console.setup_logging(run_dir)
        save_config(cfg, ctx.overrides, run_dir)
        session = ctx.session()
        tracker = None
        if job in ("steer", "faithfulness"):
            tracker = make_tracker(cfg, name=run_dir.name, group=cfg.tracker.get("group") or "circuits", job_type=job,
                                   config=chain_config(cfg), directory=Path(cfg.tracker.dir or run_dir))
        shown = fn(session, run_dir, tracker)
    from .circuits import show
    getattr(show, f"print_{job}")(shown, run_dir)
    return 0


def cmd_discover(ctx: Context) -> int:
    from .circuits.discover import discover
    return _circuit_run(ctx, "discover", lambda s, out, _t: discover(s, out_dir=out))


def cmd_steer(ctx: Context) -> int:
    from .circuits.steer import steer
    return _circuit_run(ctx, "steer", lambda s, out, t: steer(s, ctx.paths[0] if ctx.paths else None, out, tracker=t))


def cmd_faithfulness(ctx: Context) -> int:
    from .circuits.faithfulness import faithfulness
    return _circuit_run(ctx, "faithfulness",
                        lambda s, out, t: faithfulness(s, ctx.paths[0] if ctx.paths else None, out, tracker=t))


def cmd_edges(ctx: Context) -> int:
    from .circuits.edges import edges
    return _circuit_run(ctx, "edges", lambda s, out, _t: edges(s, ctx.paths[0], out))


def cmd_repl(ctx: Context) -> int:
    from .circuits.repl import Repl
    ctx.compose()
    console.setup_logging(None)
    shell = Repl(ctx.session())
    if ctx.paths:
        shell.onecmd(f"load {ctx.paths[0]}")
    shell.cmdloop()
    return 0


def cmd_dictionary(ctx: Context) -> int:
    """train [out folder] | compare | info <folder>: sparse dictionaries (SAEs, crosscoders)."""
    from .dictionary import show
    action, rest = str(ctx.paths[0]), ctx.paths[1:]
    if action == "info":
        from .dictionary.formats import load_dictionary
        if not rest:
            raise UserError("dictionary info takes a folder: crabsweep dictionary info <folder>")
        show.print_dictionary_info(load_dictionary(rest[0]))
        return 0
    if action not in ("train", "compare"):
        raise UserError(f"unknown dictionary action '{action}'; use train, compare or info")
    cfg = ctx.compose()
    if action == "train":
        from .core.models import load_model
        from .dictionary.train import train_dictionary
        console.setup_logging(None)
        loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.attn_implementation)
        folder, record = train_dictionary(loaded, cfg.dictionary.train, rest[0] if rest else None)
        show.print_dictionary_training(folder, record)
        return 0
    from .config import save_config
    from .dictionary.compare import compare
    from .io import owned_run_dir
    with owned_run_dir(ctx.run_dir, complete=lambda p: (p / "compare.json").exists()) as run_dir:
        console.setup_logging(run_dir)
        save_config(cfg, ctx.overrides, run_dir)
        record = compare(ctx.session(), cfg.dictionary.compare, run_dir)
    show.print_compare(record, run_dir)
    return 0


COMMANDS: dict[str, Command] = {
    "round": Command("one Crab Step round: train under `round.suppress`, rank recruits", cmd_round, multirun=True),
    "chain": Command("rounds 0..N, each suppressing the previous top-K; control, trajectory; resumable", cmd_chain,
                     multirun=True),
    "sweep": Command("Optuna over whole chains (the main job): pruning, storages, workers, W&B, report", cmd_sweep),
    "report": Command("a study's trials as tables and plots (report.csv, report.md, report.html, PNGs)", cmd_report,
                      (1, 1), "<study dir>"),
    "show": Command("a finished chain (per-round table, trajectory, recruits) or a study's trials, without re-running",
                    cmd_show, (1, 1), "<run or study dir>"),
    "compare": Command("chains side by side: metrics, trajectories, recruit overlap (Jaccard, rank correlation); "
                       "a study: overlap matrices", cmd_compare, (1, 64),
                       "<chain dir> <chain dir> ... | <study dir> [round=<r>]"),
    "reproduce": Command("re-run a chain from its saved config and compare the records", cmd_reproduce, (1, 2),
                         "<run dir> [out dir]"),
    "ensemble": Command("combine a chain's round adapters; study their weights", cmd_ensemble, (1, 1), "<chain dir>"),
    "discover": Command("find a circuit: RelP on prompts + targets, or contrastive; circuit.json + units.json",
                        cmd_discover, multirun=True),
    "steer": Command("generate with a circuit / unit set / chain round scaled by each multiplier (or CAA); "
                     "behaviour vs quality", cmd_steer, (0, 1), "[circuit.json | units.json | chain or round dir]",
                     multirun=True),
    "faithfulness": Command("faithfulness and completeness of a circuit over circuit sizes (mean ablation)",
                            cmd_faithfulness, (0, 1), "[circuit.json | units.json]", multirun=True),
    "edges": Command("unit-to-unit edges inside a circuit: layer flow, hubs, bottlenecks, super weights, DOT",
                     cmd_edges, (1, 1), "<circuit.json>"),
    "repl": Command("explore circuits interactively (or a script on stdin)", cmd_repl, (0, 1), "[circuit.json]"),
    "dictionary": Command("sparse dictionaries: train an SAE / crosscoder, compare the three feature ablations, "
                          "inspect a folder", cmd_dictionary, (1, 2), "train [out folder] | compare | info <folder>"),
}
