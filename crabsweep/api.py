"""The public Python API: everything a command does, a notebook can do.

    import crabsweep as cs
    session = cs.load_session("model=tiny_llama", "task=tiny", "chain.rounds=2")
    result = cs.run_round(session, suppressed=[(0, 3)])
    chain = cs.run_chain(session, out_dir="runs/c1")        # the same records as `crabsweep chain`
    chain.rounds, chain.recruits                              # pandas DataFrames
    cs.Chain.load("runs/c1").trajectory
    cs.Study.load("multirun/crabsweep-default").trials       # Optuna trials joined with per-round metrics
    cs.show("runs/c1"); cs.compare("runs/c1", "runs/c2").overlap   # look again, side by side

A session is composed exactly like the CLI (Hydra overrides, the same validation); `run_chain` writes
`.hydra/config.yaml` so `crabsweep reproduce` accepts its output.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from . import io
from .config import check_run_dir, compose_config, load_saved_config, save_config
from .core.session import Session
from .errors import UserError


def load_session(*overrides: str, command: str = "chain", config_dir: str | None = None) -> Session:
    """Compose the config from `group=option key=value` overrides (as on the command line) and load it."""
    cfg, _ = compose_config(command, list(overrides), config_dir=config_dir)
    session = Session(cfg)
    session.overrides = list(overrides)
    return session


def run_round(session: Session, suppressed=(), index: int = 0, generations: bool = True):
    """One round: a fresh adapter trained with `suppressed` units masked → a RoundResult."""
    from .loop.round import run_round as _run
    return _run(session, list(suppressed), index, generations)


def run_chain(session: Session, out_dir: str | Path | None = None, cache=None, tracker=None) -> "Chain":
    """Run (or resume) a chain into `out_dir` (a new temporary folder if None) and return it. `out_dir` must be
    new, empty or an earlier chain of the same config (resumed); another process working in it is refused."""
    from .loop.chain import run_chain as _run
    from .track.wandb import make_tracker
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="crabsweep-chain-"))
    check_run_dir(session.cfg, out)
    with io.owned_run_dir(out, resume=True, what="out_dir"):   # locked; never someone else's folder
        if not (out / ".hydra" / "config.yaml").exists():    # a resume keeps the run's own config and overrides
            save_config(session.cfg, getattr(session, "overrides", []), out)
        if tracker is None:
            tracker = make_tracker(session.cfg, name=out.name, group=session.cfg.tracker.get("group") or "chains",
                                   job_type="chain", config=chain_config(session.cfg),
                                   directory=Path(session.cfg.tracker.dir or out), adapters_from=out, run_dir=out)
        _run(session, out, cache=cache, tracker=tracker)
    return Chain.load(out)


def chain_config(cfg: DictConfig) -> dict:
    """What shaped a chain (the config minus the sweep/ensemble/tracker sections that did not)."""
    from omegaconf import OmegaConf
    from .redact import redact
    plain = redact(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in plain.items() if k not in ("sweep", "ensemble", "tracker")}


class Chain:
    """A finished (or partial) chain on disk: its config, chain.json, and DataFrame views."""

    def __init__(self, directory: Path, config: DictConfig, record: dict):
        self.dir, self.config, self.record = directory, config, record

    @classmethod
    def load(cls, directory: str | Path) -> "Chain":
        directory = Path(directory)
        if not (directory / "chain.json").exists():
            raise UserError(f"{directory} holds no chain.json; pass the folder of a finished chain")
        return cls(directory, load_saved_config(directory), io.read_json(directory / "chain.json"))

    @property
    def trajectory(self) -> dict:
        return self.record["trajectory"]

    @property
    def rounds(self):
        """One row per round: round and every scalar metric (familiar ones first)."""
        import pandas as pd
        from .track.records import round_rows
        return pd.DataFrame(round_rows(self.record))

    @property
    def recruits(self):
        """One row per (round, method, unit): every unit selected into S (`selected`) and every entry of every
        per-method top list (`top`), with its score and rank."""
        import pandas as pd
        from .track.records import recruit_rows
        return pd.DataFrame(recruit_rows(self.record))

    def __repr__(self) -> str:
        return f"Chain({self.dir}, {len(self.record['rounds'])} rounds, {self.trajectory['class']})"


class Study:
    """A sweep's study folder: its Optuna study and each trial's chain."""

    def __init__(self, directory: Path, meta: dict, study):
        self.dir, self.meta, self.study = directory, meta, study

    @classmethod
    def load(cls, directory: str | Path) -> "Study":
        from .track.report import load
        meta, study = load(directory)
        return cls(Path(directory), meta, study)

    def chain(self, trial: int) -> Chain:
        """The chain of trial number `trial`."""
        from .track.report import run_dir_of
        t = self.study.trials[trial]
        return Chain.load(run_dir_of(t, self.dir))

    @property
    def trials(self):
        """One row per trial (the rows of report.csv): state, value, `params.<k>`, trajectory, cache hits and
        each chain's per-round metrics as `r<k>.<metric>`."""
        from .track.report import trial_frame, trial_rows
        return trial_frame(trial_rows(self.study, self.dir))


def show(directory: str | Path):
    """A finished chain's per-round table (`Chain.load(dir).rounds`) or a study's trial table
    (`Study.load(dir).trials`), as a DataFrame, without re-running anything."""
    directory = Path(directory)
    if (directory / "sweep.json").exists():
        return Study.load(directory).trials
    return Chain.load(directory).rounds


def compare(*directories: str | Path, round: int = 0):  # noqa: A002
    """Chains side by side → a Comparison of DataFrames: `.metrics` (per round), `.trajectories`, `.overlap`
    (Jaccard, Spearman, Kendall of each pair's recruits per round); one study folder also gets `.matrices`
    (the overlap of round `round`'s recruits, and of the final suppressed sets, across its trials)."""
    from .track.compare import compare as _compare
    return _compare(*directories, round=round)
