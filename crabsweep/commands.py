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
    from .config import expand_multirun, sweep_dir
    jobs = expand_multirun(ctx.overrides)
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
    with owned_run_dir(ctx.run_dir) as run_dir:
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
    with owned_run_dir(ctx.run_dir) as run_dir:
        console.setup_logging(run_dir)
        chain = run_chain(ctx.session(), run_dir)
    console.print_chain(chain.record, run_dir, time.perf_counter() - t0)
    return 0


def cmd_sweep(ctx: Context) -> int:
    from .sweep.study import run_sweep
    cfg = ctx.compose()
    t0 = time.perf_counter()
    study_dir, summary = run_sweep(cfg, ctx.overrides)
    if summary is not None:
        console.print_report(study_dir, summary, time.perf_counter() - t0)
    return 0


def cmd_report(ctx: Context) -> int:
    console.setup_logging(None)
    console.print_report(ctx.paths[0], None)
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


def cmd_dictionary(ctx: Context) -> int:
    """train [out folder] | compare | info <folder>: sparse dictionaries (SAEs, crosscoders)."""
    action, rest = str(ctx.paths[0]), ctx.paths[1:]
    if action == "info":
        from .dictionary.formats import load_dictionary
        if not rest:
            raise UserError("dictionary info takes a folder: crabsweep dictionary info <folder>")
        console.print_dictionary_info(load_dictionary(rest[0]))
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
        console.print_dictionary_training(folder, record)
        return 0
    from .config import save_config
    from .dictionary.compare import compare
    from .io import owned_run_dir
    with owned_run_dir(ctx.run_dir, complete=lambda p: (p / "compare.json").exists()) as run_dir:
        console.setup_logging(run_dir)
        save_config(cfg, ctx.overrides, run_dir)
        record = compare(ctx.session(), cfg.dictionary.compare, run_dir)
    console.print_compare(record, run_dir)
    return 0


COMMANDS: dict[str, Command] = {
    "round": Command("one Crab Step round: train under `round.suppress`, rank recruits", cmd_round, multirun=True),
    "chain": Command("rounds 0..N, each suppressing the previous top-K; control, trajectory; resumable", cmd_chain,
                     multirun=True),
    "sweep": Command("Optuna over whole chains (the main job): pruning, storages, workers, W&B, report", cmd_sweep),
    "report": Command("a study's trials as tables and plots", cmd_report, (1, 1), "<study dir>"),
    "reproduce": Command("re-run a chain from its saved config and compare the records", cmd_reproduce, (1, 2),
                         "<run dir> [out dir]"),
    "ensemble": Command("combine a chain's round adapters; study their weights", cmd_ensemble, (1, 1), "<chain dir>"),
    "dictionary": Command("sparse dictionaries: train an SAE / crosscoder, compare the three feature ablations, "
                          "inspect a folder", cmd_dictionary, (1, 2), "train [out folder] | compare | info <folder>"),
}
