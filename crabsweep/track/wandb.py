"""Experiment tracking: the one place that talks to Weights & Biases.

Every chain is one W&B run (`job_type=chain`, `group=<study>`), offline by default under the study
(or run) folder's `wandb/` (`wandb sync` uploads it later). The run id is derived from the chain folder
and kept in `<run dir>/tracker.json` together with the rounds already logged, so re-running or resuming
a chain continues the same run and never logs a round twice (a finished chain opens no run at all).

Axes: `round` for per-round metrics (`round/*`, and the matched random control's `control/*`) and a
global `train/step` over all rounds' training steps; the W&B step itself is derived from the records
(one per loss point and per round), so it is monotone across resumes. At the end: the `recruits`
table (every selected unit of every round, and every per-method top list, marked) and the
`generations` table, built from chain.json. Tables are staged under `<dir>/wandb/.staging`, so the
whole folder syncs from any host that sees it. A study gets one summary run (`job_type=summary`).

W&B is an observer, never a dependency of the result: if it fails to start or to log, a warning is
logged once and the chain carries on with its full local records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from .. import io
from .records import GENERATION_COLUMNS, RECRUIT_COLUMNS, generation_rows, recruit_rows

log = logging.getLogger(__name__)
STATE_FILE = "tracker.json"
# per-round metrics whose best value matters besides the last one (W&B summaries via define_metric)
SUMMARIES = {"final_gap": "max,last", "specificity": "max,last", "selectivity": "max,last",
             "heldout_loss": "min,last", "task_score": "min,last", "behaviour_ce": "max,last"}
CONTROL_METRICS = ("final_loss", "final_gap", "heldout_loss", "n_suppressed", "init_loss")


class TrackerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    mode: Literal["offline", "online", "disabled"]
    project: str
    entity: str | None = None
    dir: str | None = None
    group: str | None = None
    log_adapters: bool = False


class Tracker(Protocol):
    def log_round(self, rec: dict) -> None: ...

    def finish(self, chain: dict | None, state: str = "finished") -> None: ...


class NullTracker:
    group = None

    def log_round(self, rec: dict) -> None:
        pass

    def log_evaluation(self, row: dict, index: int) -> None:
        pass

    def log_summary(self, summary: dict, images: dict[str, Path]) -> None:
        pass

    def finish(self, chain: dict | None, state: str = "finished") -> None:
        pass


def _scalars(d: dict, prefix: str, skip: tuple = ()) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_id(run_dir: str | Path, name: str) -> str:
    """A W&B run id derived from the run folder: readable name + hash of the folder's absolute path."""
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")[:48]
    return f"{slug}-{digest}" if slug else digest


class WandbTracker:
    """One W&B run, opened lazily (only when there is something new to log); every call is guarded so
    that a W&B failure never stops the chain. `run_dir` holds tracker.json (the run id and what is logged)."""

    def __init__(self, tcfg, *, name: str, group: str, job_type: str, config: dict, directory: Path,
                 adapters_from: Path | None = None, run_dir: Path | None = None):
        self.tcfg, self.name, self.group, self.job_type, self.config = tcfg, name, group, job_type, config
        self.directory = Path(directory)
        self.run_dir = Path(run_dir) if run_dir is not None else (Path(adapters_from) if adapters_from else None)
        self.adapters_from = adapters_from
        self.run = None
        self.broken = False
        self.step = 0                     # the W&B step: one per loss point and one per round
        self.train_step = 0               # global training step over all rounds
        self.seen: list[dict] = []        # rounds passed to this tracker (tables of a failed chain)
        self.evaluation_rows: list[list] = []
        self.state = self._load_state()

    # -- state and guard -------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        path = self.run_dir / STATE_FILE if self.run_dir is not None else None
        state = io.read_json(path) if path is not None and path.exists() else {}
        fresh = {"id": state.get("id") or (run_id(self.run_dir, self.name) if self.run_dir else None),
                 "mode": self.tcfg.mode, "rounds": [], "train_steps": [], "finished": False, "summary": None}
        if state.get("mode") != self.tcfg.mode or (self.tcfg.mode == "offline" and not self._offline_runs(fresh["id"])):
            return fresh                       # nothing of this run exists where we log now: log it all
        state = {**fresh, **state}
        if self.tcfg.mode == "offline" and not state["finished"]:
            state.update(self._on_disk(self._offline_runs(state["id"])) or {})
        return state

    @staticmethod
    def _on_disk(runs: list[Path]) -> dict | None:
        """What the earlier offline folders really hold (a killed process may have recorded a round in
        tracker.json that W&B never wrote): their rounds and training steps, read with `wandb leet inspect`."""
        import subprocess
        import sys
        rounds, steps = set(), set()
        for run in runs:
            try:
                out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json",
                                      str(run)], capture_output=True, text=True, timeout=60, check=True).stdout
            except Exception as e:  # noqa: BLE001 — unreadable: trust tracker.json
                log.info("W&B: could not read %s (%s); trusting %s", run, e, STATE_FILE)
                return None
            for line in out.splitlines():
                item = json.loads(line).get("history", {}).get("item", {}) if line.strip() else {}
                if "round" in item:
                    rounds.add(int(item["round"]))
                if "train/step" in item:
                    steps.add(int(item["train/step"]))
        return {"rounds": sorted(rounds), "train_steps": sorted(steps)}

    def _offline_runs(self, rid: str | None) -> list[Path]:
        return sorted((self.directory / "wandb").glob(f"offline-run-*-{rid}")) if rid else []

    def _save_state(self) -> None:
        if self.run_dir is not None and self.run_dir.is_dir():
            io.write_json(self.run_dir / STATE_FILE, self.state)

    @contextmanager
    def _staging(self):
        """W&B stages tables/artifacts under WANDB_DATA_DIR (default: the user's home): keep them in the folder."""
        keys = {"WANDB_DATA_DIR": ".staging", "WANDB_ARTIFACT_DIR": ".artifacts", "WANDB_CACHE_DIR": ".cache"}
        old = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: str((self.directory / "wandb" / v).resolve()) for k, v in keys.items()})
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _guard(self, fn, *args):
        if self.broken:
            return None
        try:
            with self._staging():
                return fn(*args)
        except Exception as e:  # noqa: BLE001 — any W&B failure degrades to local records only
            log.warning("W&B %s failed (%s: %s); continuing with local records only", fn.__name__.lstrip("_"),
                        type(e).__name__, e)
            self.broken, self.run = True, None
            return None

    def _ensure_run(self) -> None:
        if self.run is not None:
            return
        import wandb
        (self.directory / "wandb").mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=self.tcfg.project, entity=self.tcfg.get("entity"), group=self.group,
                              job_type=self.job_type, name=self.name, config=self.config, dir=str(self.directory),
                              id=self.state["id"], resume="allow" if self.state["id"] else None,
                              mode=self.tcfg.mode, reinit="create_new",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.state["id"] = self.run.id
        self.run.define_metric("round")
        self.run.define_metric("round/*", step_metric="round")
        for name, how in SUMMARIES.items():
            self.run.define_metric(f"round/{name}", step_metric="round", summary=how)
        self.run.define_metric("control/*", step_metric="round")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("train/loss", step_metric="train/step", summary="min,last")
        self.run.define_metric("ensemble/eval")
        self.run.define_metric("ensemble/*", step_metric="ensemble/eval")

    # -- chains --------------------------------------------------------------------------------------
    def log_round(self, rec: dict) -> None:
        """Log round `rec` (skipped, but counted on the axes, if an earlier invocation logged it)."""
        self.seen.append(rec)
        n = len(rec["loss_curve"])
        if rec["round"] in self.state["rounds"]:
            self.step, self.train_step = self.step + n + 1, self.train_step + n
            return
        self._guard(self._log_round, rec)
        self.step, self.train_step = self.step + n + 1, self.train_step + n

    def _log_round(self, rec: dict) -> None:
        self._ensure_run()
        r = rec["round"]
        written = set(self.state.get("train_steps") or ())          # a killed run's steps W&B did write
        for i, point in enumerate(rec["loss_curve"]):
            if self.train_step + i in written:
                continue
            self.run.log({"train/step": self.train_step + i, "train/round": r,
                          "train/round_step": point.get("step", i), **_scalars(point, "train/", skip=("step",))},
                         step=self.step + i, commit=True)
        row = {"round": r, **_scalars(rec["metrics"], "round/"), **self._control(r)}
        self.run.log(row, step=self.step + len(rec["loss_curve"]), commit=True)   # written now, not at the next log
        if self.tcfg.get("log_adapters") and self.run_dir is not None:
            import wandb
            art = wandb.Artifact(f"{self.state['id']}-round{r}-adapter", type="adapter")
            art.add_dir(str(self.run_dir / f"round_{r}" / "adapter"))
            self.run.log_artifact(art)
        self.state["rounds"] = sorted({*self.state["rounds"], r})
        self._save_state()

    def _control(self, r: int) -> dict:
        """The matched random control of round r (its own record), as `control/*` on the round axis."""
        path = self.run_dir / f"round_{r}" / "control" / "record.json" if self.run_dir is not None else None
        if path is None or not path.exists():
            return {}
        m = io.read_json(path)["metrics"]
        return _scalars({k: m[k] for k in CONTROL_METRICS if k in m}, "control/")

    # -- ensembles -----------------------------------------------------------------------------------
    def log_evaluation(self, row: dict, index: int) -> None:
        self._guard(self._log_evaluation, row, index)

    def _log_evaluation(self, row: dict, index: int) -> None:
        self._ensure_run()
        weights = {f"ensemble/w_round{r}": w for r, w in row["weights"].items()}
        self.run.log({"ensemble/eval": index, **_scalars(row, "ensemble/"), **weights})
        self.evaluation_rows.append([index, row["kind"], str(row["weights"]), row.get("heldout_loss", row.get("train_loss")), row["task_score"],
                                     row["degeneracy"], row["texts"][0] if row["texts"] else ""])

    # -- circuits (steer / faithfulness sweeps) ----------------------------------------------------------
    def log_sweep(self, name: str, rows: list[dict], x: str, images: dict[str, Path], summary: dict) -> None:
        self._guard(self._log_sweep, name, rows, x, images, summary)

    def _log_sweep(self, name, rows, x, images, summary) -> None:
        import wandb
        self.run.define_metric(f"{name}/{x}")
        self.run.define_metric(f"{name}/*", step_metric=f"{name}/{x}")
        for row in rows:
            self.run.log(_scalars(row, f"{name}/"))
        self.run.log({k: wandb.Image(str(p)) for k, p in images.items() if p.exists()})
        self.run.summary.update({k: v for k, v in summary.items() if v is not None})

    def finish(self, chain: dict | None, state: str = "finished") -> None:
        if self.state["finished"] and self.run is None:
            return                                  # a re-run of a finished, fully logged chain
        self._guard(self._finish, chain, state)

    def _finish(self, chain: dict | None, state: str) -> None:
        import wandb
        if self.run is None and not self.seen and not self.evaluation_rows:
            return                                  # nothing was ever logged by this invocation
        self._ensure_run()
        records = chain if chain is not None else {"rounds": [{k: rec.get(k) for k in ("round", "recruits",
                                                                                      "generations")} for rec in self.seen]}
        tables = {"recruits": (RECRUIT_COLUMNS, [[row.get(c) for c in RECRUIT_COLUMNS] for row in recruit_rows(records)]),
                  "generations": (GENERATION_COLUMNS, generation_rows(records)),
                  "evaluations": (["eval", "kind", "weights", "heldout_loss", "task_score", "degeneracy",
                                   "first_text"], self.evaluation_rows)}
        data = {name: wandb.Table(columns=cols, data=rows) for name, (cols, rows) in tables.items() if rows}
        if data and self.seen:
            self.run.log(data, step=self.step, commit=True)          # after the last round, on the same axis
        elif data:
            self.run.log(data)
        if chain is not None:
            self.run.summary["trajectory"] = chain["trajectory"]["class"]
            self.run.summary["trajectory_reason"] = chain["trajectory"]["reason"]
            self.run.summary["stopped"] = chain["stopped"] or ""
            self.run.summary["rounds_completed"] = len(chain["rounds"])
        self.run.summary["state"] = state
        self.run.finish(exit_code=0 if state != "failed" else 1)
        self.run = None
        self.state["finished"] = chain is not None and state == "finished"
        self._save_state()

    # -- study summary -------------------------------------------------------------------------------
    def log_summary(self, summary: dict, images: dict[str, Path]) -> None:
        """The study's summary run; skipped when this exact summary was logged before (a re-run sweep)."""
        digest = hashlib.sha1(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()
        if self.state.get("summary") == digest:
            return
        self._guard(self._log_summary, summary, images, digest)

    def _log_summary(self, summary: dict, images: dict[str, Path], digest: str) -> None:
        import wandb
        self._ensure_run()
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.log({name: wandb.Image(str(path)) for name, path in images.items()
                      if Path(path).exists() and Path(path).suffix == ".png"})
        self.run.finish()
        self.run = None
        self.state["summary"] = digest
        self._save_state()


def make_tracker(cfg, *, name: str, group: str, job_type: str, config: dict, directory: Path,
                 adapters_from: Path | None = None, run_dir: Path | None = None):
    """A tracker for one run. `run_dir` (the chain or study folder) keeps the run's id and what it logged;
    without one (e.g. an ensemble) every invocation is a new run."""
    if cfg.tracker.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg.tracker, name=name, group=group, job_type=job_type, config=config,
                        directory=directory, adapters_from=adapters_from, run_dir=run_dir)
