"""Ensembles of a chain's round adapters, and an Optuna study of their weights.

Combinations (PEFT `add_weighted_adapter`):
  exact   ΔW = Σ wᵢ ΔWᵢ exactly (PEFT `cat`: the ranks concatenate).
  svd     Σ wᵢ ΔWᵢ truncated to `ensemble.svd_rank` by SVD.
  linear  PEFT's "linear", which the reference used: A = Σ ±√(wᵢsᵢ)·Aᵢ and B = Σ √(wᵢsᵢ)·Bᵢ are mixed
          separately, so ΔW = B·A gains cross terms √(wᵢwⱼ)·BᵢAⱼ and is NOT Σ wᵢ ΔWᵢ unless the A's agree.
An evaluation measures held-out loss, the task score of greedy held-out generations and their
degeneracy (the repeated word-3-gram rate), under an optional suppression set (none, the union of
the rounds' sets, or one round's). `ensemble.study=true` searches weights with Optuna (simplex or free
scale) and runs a fixed depth sweep (uniform → deepest round); each evaluation goes to a local table
and to W&B in the chain's group. Each `crabsweep ensemble` writes its records into a new folder of the
chain (`ensemble/`, then `ensemble-1/`, …): an earlier ensemble's records are never overwritten.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import optuna
from omegaconf import OmegaConf

from .. import io
from ..config import load_saved_config
from ..config.schema import validate
from ..errors import UserError
from .metrics import eval_loss, generate
from ..core.session import Session
from ..core.basis import unit_from_json

log = logging.getLogger(__name__)
COMBINATIONS = {"exact": "cat", "svd": "svd", "linear": "linear"}


def degeneracy(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 = none, → 1 = a loop)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


class Ensembler:
    """A chain's adapters loaded once next to the base model; combinations made and evaluated on demand."""

    def __init__(self, chain_dir: str | Path, ecfg, session: Session | None = None):
        self.chain_dir = Path(chain_dir)
        self.ecfg = ecfg
        rounds = sorted(int(p.parent.parent.name.split("_")[1])
                        for p in self.chain_dir.glob("round_*/adapter/adapter_config.json"))
        if not rounds and any(self.chain_dir.glob("round_*/adapter/crabsweep_adapter.json")):
            raise UserError("ensembles combine LoRA adapters; this chain used adapter=full")
        if not rounds:
            raise UserError(f"{self.chain_dir} holds no round_<r>/adapter; pass the folder of a `crabsweep chain` run")
        wanted = list(ecfg.rounds) if ecfg.rounds is not None else rounds
        missing = [r for r in wanted if r not in rounds]
        if missing:
            raise UserError(f"ensemble.rounds names rounds {missing} that {self.chain_dir} does not have "
                            f"(it has {rounds})")
        if len(wanted) < 1:
            raise UserError("ensemble.rounds is empty; name at least one round")
        self.rounds = wanted
        self.records = {r: io.read_json(self.chain_dir / f"round_{r}" / "record.json") for r in rounds}
        self.units = self._suppression_units()
        if ecfg.combination not in COMBINATIONS:
            raise UserError(f"ensemble.combination={ecfg.combination} must be exact, svd or linear")
        self.session = session

    def load(self) -> "Ensembler":
        """Load the chain's model (unless a session was given) and the chosen rounds' adapters."""
        if self.session is None:
            cfg = load_saved_config(self.chain_dir)
            validate(cfg)
            self.session = Session(cfg)
        if not self.session.adapter.combinable:
            raise UserError(f"ensembles combine LoRA adapters; this chain used adapter={self.session.adapter.name}")
        for r in self.rounds:
            folder = self.chain_dir / f"round_{r}" / "adapter"
            try:
                self.session.model.load_adapter(str(folder), adapter_name=f"round_{r}")
            except io.UNREADABLE as e:
                raise UserError(f"{folder} is damaged ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                                "restore it or re-run the chain into a new folder") from e
        self.units = self.session.basis.check(self.units, "ensemble.suppression unit")
        self.n_suppressed = len(self.units)
        return self

    def _suppression_units(self) -> list:
        spec = str(self.ecfg.suppression)
        if spec == "none":
            units = []
        elif spec == "union":
            units = list(dict.fromkeys(unit_from_json(u) for r in self.rounds for u in self.records[r]["suppressed"]))
        elif spec.startswith("round:") and spec[6:].isdigit() and int(spec[6:]) in self.records:
            units = [unit_from_json(u) for u in self.records[int(spec[6:])]["suppressed"]]
        else:
            raise UserError(f"ensemble.suppression={spec} must be none, union or round:<r> with r in "
                            f"{sorted(self.records)}")
        return units

    def check_weights(self, weights) -> list[float]:
        weights = [float(w) for w in weights]
        if not all(math.isfinite(w) for w in weights):
            raise UserError(f"ensemble.weights {weights} must be finite numbers")
        if len(weights) != len(self.rounds):
            raise UserError(f"ensemble.weights has {len(weights)} values for {len(self.rounds)} rounds {self.rounds}")
        if self.ecfg.simplex:
            if any(w < 0 for w in weights):
                raise UserError(f"ensemble.weights {weights} has negative values but ensemble.simplex=true; "
                                "use non-negative weights or ensemble.simplex=false")
            total = sum(weights)
            if total <= 0:
                raise UserError("ensemble.weights sum to 0; give at least one round a positive weight")
            weights = [w / total for w in weights]
        return weights

    def combine(self, weights: list[float], name: str = "ensemble") -> None:
        """Make `name` the active adapter: the chosen rounds combined with `weights`."""
        model = self.session.model
        if name in model.peft_config:
            model.delete_adapter(name)
        kind = self.ecfg.combination
        model.add_weighted_adapter([f"round_{r}" for r in self.rounds], weights, adapter_name=name,
                                   combination_type=COMBINATIONS[kind],
                                   svd_rank=self.ecfg.get("svd_rank") if kind == "svd" else None)
        model.set_adapter(name)

    @property
    def loss_name(self) -> str:
        """What the loss is measured on: held-out samples, or the train samples when the task has none."""
        return "heldout_loss" if self.session.task.heldout else "train_loss"

    def evaluate(self, weights: list[float]) -> dict:
        self.combine(weights)
        s = self.session
        examples = s.task.heldout or s.task.train
        with s.intervene(s.mask(self.units)):
            loss = eval_loss(s, examples)
            texts = generate(s, examples, int(self.ecfg.max_new_tokens), int(s.cfg.eval.batch_size))
        return {"weights": dict(zip(map(str, self.rounds), weights)), self.loss_name: loss["plain"],
                "task_score": sum(map(s.task.scorer, texts)) / len(texts),
                "degeneracy": sum(map(degeneracy, texts)) / len(texts), "texts": texts,
                "combination": self.ecfg.combination, "n_suppressed": self.n_suppressed}

    def save(self, weights: list[float], target: str | Path) -> Path:
        """Save the combination as a plain PEFT adapter folder (PeftModel.from_pretrained loads it)."""
        self.combine(weights)
        target = io.check_new(target, "ensemble.save")
        try:
            with io.staged_dir(target) as tmp:
                self.session.model.save_pretrained(str(tmp), selected_adapters=["ensemble"])
                for f in (tmp / "ensemble").iterdir():
                    shutil.move(str(f), tmp / f.name)
                (tmp / "ensemble").rmdir()
        except OSError as e:
            raise UserError(f"cannot write ensemble.save={target} ({e.strerror or e}); pass a new, writable "
                            "path") from e
        return target


def depth_grid(n: int, steps: int) -> list[list[float]]:
    """Weights moving step by step from uniform to the deepest round alone."""
    out = []
    for i in range(steps):
        t = i / (steps - 1) if steps > 1 else 1.0
        out.append([(1 - t) / n + (t if j == n - 1 else 0.0) for j in range(n)])
    return out


def study_weights(ens: Ensembler, tracker=None, out_dir: Path | None = None) -> dict:
    """Depth sweep (fixed grid) + an Optuna study over weights; every evaluation logged in `out_dir`."""
    e = ens.ecfg
    out_dir = Path(out_dir) if out_dir is not None else ens.chain_dir / "ensemble"
    metric, direction = e.objective.metric, e.objective.direction
    if metric == "heldout_loss" and ens.loss_name == "train_loss":
        log.warning("the task has no held-out samples: the ensemble study minimizes train_loss instead")
        metric = "train_loss"
    table: list[dict] = []

    def record(kind: str, result: dict) -> float:
        row = {"kind": kind, **{k: v for k, v in result.items() if k != "texts"}, "texts": result["texts"]}
        table.append(row)
        io.write_json(out_dir / "evaluations.json", table)
        if tracker is not None:
            tracker.log_evaluation(row, len(table) - 1)
        return result[metric]

    singles = {}
    for i, r in enumerate(ens.rounds):
        w = [1.0 if j == i else 0.0 for j in range(len(ens.rounds))]
        singles[r] = record(f"single round {r}", ens.evaluate(w))
    for w in depth_grid(len(ens.rounds), int(e.depth_steps)):
        record("depth sweep", ens.evaluate(w))

    storage = f"sqlite:///{(out_dir / 'study.db').resolve()}"
    study = optuna.create_study(study_name="ensemble-weights", storage=storage, direction=direction,
                                sampler=optuna.samplers.TPESampler(seed=int(e.seed)), load_if_exists=True)

    def objective(trial):
        if e.simplex:
            raw = [trial.suggest_float(f"x_{r}", 1e-3, 1.0, log=True) for r in ens.rounds]
        else:
            raw = [trial.suggest_float(f"w_{r}", float(e.low), float(e.high)) for r in ens.rounds]
        weights = ens.check_weights(raw)
        trial.set_user_attr("weights", weights)
        return record(f"study trial {trial.number}", ens.evaluate(weights))

    remaining = int(e.n_trials) - len(study.trials)
    if remaining > 0:
        study.optimize(objective, n_trials=remaining)
    pool = [row for row in table if row[metric] is not None and math.isfinite(row[metric])]
    if not pool:
        raise UserError(f"no ensemble evaluation gave a finite {metric}; check the chain's adapters and weights")
    best = (min if direction == "minimize" else max)(pool, key=lambda row: row[metric])
    summary = {"objective": {**OmegaConf.to_container(e.objective), "metric": metric}, "best": {k: v for k, v in best.items() if k != "texts"},
               "single_rounds": {str(r): v for r, v in singles.items()}, "evaluations": len(table)}
    io.write_json(out_dir / "summary.json", summary)
    return summary


def _has_records(folder: Path) -> bool:
    return (folder / "summary.json").exists() or (folder / "evaluations.json").exists()


def run_ensemble(chain_dir: Path, cfg) -> dict:
    """`crabsweep ensemble`: combine the chain's round adapters with the given weights, or study them."""
    from ..console import setup_logging
    from ..track.wandb import make_tracker
    e = cfg.ensemble
    ens = Ensembler(chain_dir, e)                                  # validates rounds and suppression
    weights = ens.check_weights(e.weights if e.weights is not None else [1.0] * len(ens.rounds))
    if e.save:
        io.check_new(e.save, "ensemble.save")                      # refused now, not after the evaluations
    chain = chain_dir / "chain.json"
    group = (io.read_json(chain)["config"].get("group") if chain.exists() else None) or "chains"
    out = io.free_name(chain_dir, "ensemble")
    with io.owned_run_dir(out, complete=_has_records, what="ensemble folder"):
        setup_logging(out)
        ens.load()
        tracker = make_tracker(cfg, name=f"{chain_dir.name}-{out.name}", group=group, job_type="ensemble",
                               config=OmegaConf.to_container(e), directory=Path(cfg.tracker.dir or out))
        if e.study:
            summary = study_weights(ens, tracker, out)
            weights = [summary["best"]["weights"][str(r)] for r in ens.rounds]
        else:
            result = ens.evaluate(weights)
            tracker.log_evaluation({"kind": "weights", **result}, 0)
            summary = {"result": result, "rounds": ens.rounds, "weights": weights}
            io.write_json(out / "summary.json", summary)
        tracker.finish(None)
    summary["loss_name"] = ens.loss_name
    summary["dir"] = str(out)
    if e.save:
        summary["saved"] = str(ens.save(weights, e.save))
    return summary
