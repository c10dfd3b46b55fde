"""Experiment tracking: the one place that talks to Weights & Biases.

Every chain is one W&B run (`job_type=chain`, `group=<study>`), offline by default under
`multirun/<study>/wandb` (`wandb sync` uploads it later). Per-round metrics live on a `round` axis and
per-step losses on a `train/step` axis (`define_metric`); recruits and generations are tables; round
adapters are optional artifacts. A study gets one summary run (`job_type=summary`).

W&B is an observer, never a dependency of the result: if it fails to start or to log, a warning is
logged once and the chain carries on with its full local records.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)


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

    def finish(self, chain: dict | None, state: str = "finished") -> None:
        pass


def _scalars(d: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class WandbTracker:
    """One W&B run; every call is guarded so that a W&B failure never stops the chain."""

    def __init__(self, tcfg, *, name: str, group: str, job_type: str, config: dict, directory: Path,
                 adapters_from: Path | None = None):
        self.tcfg, self.adapters_from, self.group = tcfg, adapters_from, group
        self.run = None
        self.recruit_rows: list[list] = []
        self.generation_rows: list[list] = []
        self.evaluation_rows: list[list] = []
        self.step = 0
        self._guard(self._start, name, group, job_type, config, directory)

    def _guard(self, fn, *args):
        if fn != self._start and self.run is None:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 — any W&B failure degrades to local records only
            log.warning("W&B %s failed (%s: %s); continuing with local records only", fn.__name__,
                        type(e).__name__, e)
            self.run = None
            return None

    def _start(self, name, group, job_type, config, directory):
        import wandb
        directory.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=self.tcfg.project, entity=self.tcfg.get("entity"), group=group,
                              job_type=job_type, name=name, config=config, dir=str(directory),
                              mode=self.tcfg.mode, reinit="create_new",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.run.define_metric("round")
        self.run.define_metric("round/*", step_metric="round")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("ensemble/eval")
        self.run.define_metric("ensemble/*", step_metric="ensemble/eval")

    # -- chains --------------------------------------------------------------------------------------
    def log_round(self, rec: dict) -> None:
        self._guard(self._log_round, rec)

    def _log_round(self, rec: dict) -> None:
        r = rec["round"]
        for point in rec["loss_curve"]:
            self.run.log({"train/step": self.step, "train/round": r, **_scalars(point, "train/")})
            self.step += 1
        self.run.log({"round": r, **_scalars(rec["metrics"], "round/")})
        recruits = rec["recruits"]
        for method, ranked in recruits.get("top", recruits).items():
            if isinstance(ranked, list):
                self.recruit_rows += [[r, *_unit_columns(x["unit"]), x["score"], method,
                                       method == recruits.get("method") and x in recruits.get("selected", [])]
                                      for x in ranked]
        self.generation_rows += [[r, g["id"], g["prompt"], g["text"], g["mask"], g["score"]]
                                 for g in rec["generations"]]
        if self.tcfg.get("log_adapters") and self.adapters_from is not None:
            import wandb
            art = wandb.Artifact(f"{self.run.name}-round{r}-adapter", type="adapter")
            art.add_dir(str(self.adapters_from / f"round_{r}" / "adapter"))
            self.run.log_artifact(art)

    # -- ensembles -----------------------------------------------------------------------------------
    def log_evaluation(self, row: dict, index: int) -> None:
        self._guard(self._log_evaluation, row, index)

    def _log_evaluation(self, row: dict, index: int) -> None:
        weights = {f"ensemble/w_round{r}": w for r, w in row["weights"].items()}
        self.run.log({"ensemble/eval": index, **_scalars(row, "ensemble/"), **weights})
        self.evaluation_rows.append([index, row["kind"], str(row["weights"]), row["heldout_loss"], row["task_score"],
                                     row["degeneracy"], row["texts"][0] if row["texts"] else ""])

    def finish(self, chain: dict | None, state: str = "finished") -> None:
        self._guard(self._finish, chain, state)

    def _finish(self, chain: dict | None, state: str) -> None:
        import wandb
        tables = {
            "recruits": (["round", "layer", "index", "score", "method", "selected"], self.recruit_rows),
            "generations": (["round", "id", "prompt", "text", "mask", "task_score"], self.generation_rows),
            "evaluations": (["eval", "kind", "weights", "heldout_loss", "task_score", "degeneracy", "first_text"],
                            self.evaluation_rows)}
        self.run.log({name: wandb.Table(columns=cols, data=rows) for name, (cols, rows) in tables.items() if rows})
        if chain is not None:
            self.run.summary["trajectory"] = chain["trajectory"]["class"]
            self.run.summary["trajectory_reason"] = chain["trajectory"]["reason"]
            self.run.summary["stopped"] = chain["stopped"] or ""
            self.run.summary["rounds_completed"] = len(chain["rounds"])
        self.run.summary["state"] = state
        self.run.finish(exit_code=0 if state != "failed" else 1)
        self.run = None

    # -- study summary -------------------------------------------------------------------------------
    def log_summary(self, summary: dict, images: dict[str, Path]) -> None:
        self._guard(self._log_summary, summary, images)

    def _log_summary(self, summary: dict, images: dict[str, Path]) -> None:
        import wandb
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.log({name: wandb.Image(str(path)) for name, path in images.items() if path.exists()})
        self.run.finish()
        self.run = None


def make_tracker(cfg, *, name: str, group: str, job_type: str, config: dict, directory: Path,
                 adapters_from: Path | None = None):
    if cfg.tracker.mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg.tracker, name=name, group=group, job_type=job_type, config=config,
                        directory=directory, adapters_from=adapters_from)


def _unit_columns(u: dict) -> tuple:
    """(layer, index) of a unit's JSON — for dictionary features (dictionary name, feature)."""
    return (u["layer"], u["index"]) if "layer" in u else (u.get("dictionary"), u.get("feature"))
