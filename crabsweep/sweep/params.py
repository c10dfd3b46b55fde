"""The search space (`sweep.params`), the samplers and the pruners of a sweep.

`sweep.params` maps config keys to a list of choices (categorical) or a spec
`{type: categorical|int|float, choices | low, high, log, step}`. Keys are dotted (`k.k: [8, 16]`) or nested
(`k: {k: [8, 16]}`) — Hydra reads `sweep.params.k.k=[4,8]` on the command line as the nested form, so one
param can be set (`sweep.params.k.k=[4,8]`, `+sweep.params.train.lr={type: float, low: 1e-4, high: 1e-2}`)
or removed (`~sweep.params.attribution`) on its own; a dict is a spec when its `type` is a string.

Samplers: `auto` (default) enumerates a space whose params are all categorical when its grid fits the
budget (grid size ≤ n_trials) and uses TPE otherwise; `grid` (= `bruteforce`) visits every point once in a
seeded random order; `tpe`, `random`, `cmaes` (numeric spaces). Unless `sweep.allow_repeats=true`, no
sampler proposes a point the study already has (any finished or running trial): a repeated proposal is
re-drawn, and after a few tries replaced by a random unvisited point.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import warnings

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from ..registry import Registry

_SPEC_KEYS = {"type", "choices", "low", "high", "log", "step"}
_SCALARS = (str, int, float, bool, type(None))


# --------------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------------
def search_space(params) -> dict[str, dict]:
    """`sweep.params` (nested or dotted) → {dotted config key: spec}."""
    plain = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else dict(params or {})
    space: dict[str, dict] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and not isinstance(value.get("type"), str):
                walk(value, f"{name}.")
                continue
            if name in space:
                raise UserError(f"sweep.params sets {name} twice (as a dotted key and nested); keep one of them")
            space[name] = _spec(name, value)

    walk(plain, "")
    return space


def _spec(name: str, value) -> dict:
    where = f"sweep.params.{name}"
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict):
        raise UserError(f"{where}={value!r}: give a list of choices or {{type: int|float, low, high}}")
    spec = dict(value)
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; use {', '.join(sorted(_SPEC_KEYS))}")
    kind = spec.get("type")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: a categorical param needs a non-empty list of choices")
        if not all(isinstance(c, _SCALARS) for c in choices):
            raise UserError(f"{where}: choices must be numbers, strings, booleans or null (not lists or dicts)")
        if len({repr(c) for c in choices}) != len(choices):
            raise UserError(f"{where}: choices {choices} repeat a value; list each once")
        return spec
    if kind not in ("int", "float"):
        raise UserError(f"{where}: type must be categorical, int or float (got {kind!r})")
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), bool(spec.get("log", False))
    number = int if kind == "int" else (int, float)
    if not (isinstance(low, number) and isinstance(high, number)) or isinstance(low, bool) or low > high:
        raise UserError(f"{where}: {kind} params need numeric low ≤ high")
    if step is not None and not (isinstance(step, number) and step > 0):
        raise UserError(f"{where}: step must be a positive {kind}")
    if log and (low <= 0 or (step is not None and kind == "float") or (kind == "int" and step not in (None, 1))):
        raise UserError(f"{where}: log=true needs low > 0 and no step")
    return spec


def distribution(spec: dict):
    if spec["type"] == "categorical":
        return CategoricalDistribution(spec["choices"])
    if spec["type"] == "int":
        return IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=spec.get("step") or 1)
    return FloatDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)), step=spec.get("step"))


def values(spec: dict) -> list | None:
    """Every value of a finite param (None for a continuous float)."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    step = spec.get("step") or (1 if spec["type"] == "int" else None)
    if step is None:
        return None
    n = int(math.floor((spec["high"] - spec["low"]) / step + 1e-9)) + 1
    return [spec["low"] + i * step for i in range(n)]


def space_size(space: dict) -> float:
    """How many distinct points the space holds (math.inf when a float is continuous)."""
    size = 1
    for spec in space.values():
        vals = values(spec)
        if vals is None:
            return math.inf
        size *= len(vals)
    return size


def suggest(trial, key: str, spec: dict):
    if spec["type"] == "categorical":
        return trial.suggest_categorical(key, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step") or 1, log=spec.get("log", False))
    return trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False))


def override(key: str, value) -> str:
    """`key=value` as a Hydra override (strings with special characters quoted)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str) and not re.fullmatch(r"[\w./:+-]+", value):
        text = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    else:
        text = str(value)
    return f"{key}={text}"


def point(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------
class GridSampler(optuna.samplers.BruteForceSampler):
    """BruteForceSampler for ask/tell: its `after_trial` calls `study.stop()` once the grid is exhausted,
    which Optuna allows only inside `optimize()`; here the sweep's cap (≤ the grid size) ends the study."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


class NoRepeatSampler(optuna.samplers.BaseSampler):
    """Proposes whole points with `base` and never one the study already holds (see the module doc)."""

    def __init__(self, base, space: dict, seed: int, tries: int = 20):
        self.base, self.space, self.tries = base, space, tries
        self.dists = {k: distribution(spec) for k, spec in space.items()}
        self.rng = random.Random(seed)

    def infer_relative_search_space(self, study, trial):
        return dict(self.dists)

    def sample_relative(self, study, trial, search_space):
        if trial.system_attrs.get("fixed_params"):
            return {}                                # an enqueued re-run keeps its own params
        seen = {point(t.params) for t in study.get_trials(deepcopy=False) if t.number != trial.number and t.params}
        params = {}
        for _ in range(self.tries):
            params = self._propose(study, trial)
            if point(params) not in seen:
                return params
        return self._unvisited(seen) or params

    def _propose(self, study, trial) -> dict:
        space = self.base.infer_relative_search_space(study, trial)
        rel = self.base.sample_relative(study, trial, space) if space else {}
        return {k: rel[k] if k in rel else self.base.sample_independent(study, trial, k, d)
                for k, d in self.dists.items()}

    def _unvisited(self, seen: set) -> dict | None:
        keys = list(self.space)
        if space_size(self.space) <= 100_000:
            free = [p for p in itertools.product(*(values(self.space[k]) for k in keys))
                    if point(dict(zip(keys, p))) not in seen]
            return dict(zip(keys, self.rng.choice(free))) if free else None
        for _ in range(1000):
            params = {k: self.rng.choice(values(self.space[k])) if values(self.space[k]) is not None
                      else self.rng.uniform(self.space[k]["low"], self.space[k]["high"]) for k in keys}
            if point(params) not in seen:
                return params
        return None

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


SAMPLERS = Registry("sampler", key="sweep.sampler.name")
SAMPLERS.register("tpe")(lambda seed, space: optuna.samplers.TPESampler(seed=seed))
SAMPLERS.register("random")(lambda seed, space: optuna.samplers.RandomSampler(seed=seed))


@SAMPLERS.register("grid")
def _grid(seed, space):
    if space_size(space) == math.inf:
        raise UserError("sweep.sampler=grid needs a finite space: give float params a step, or use tpe/random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return GridSampler(seed=seed)


SAMPLERS.register("bruteforce")(_grid)


@SAMPLERS.register("cmaes")
def _cmaes(seed, space):
    if any(spec["type"] == "categorical" for spec in space.values()):
        raise UserError("sweep.sampler=cmaes needs a numeric search space (int/float params only); "
                        "use tpe, random or grid for categorical params")
    return optuna.samplers.CmaEsSampler(seed=seed)


def sampler_name(scfg, space: dict) -> str:
    """`auto` → grid when every param is categorical and the grid fits in n_trials; tpe otherwise."""
    name = scfg.sampler.name
    if name != "auto":
        return name
    categorical = all(spec["type"] == "categorical" for spec in space.values())
    return "grid" if categorical and space_size(space) <= int(scfg.n_trials) else "tpe"


def make_sampler(scfg, space: dict, seed: int = 0):
    """The configured sampler, seeded with `seed` (per worker), wrapped so it never repeats a point."""
    name = sampler_name(scfg, space)
    base = SAMPLERS.get(name).obj(seed, space)
    if name in ("grid", "bruteforce") or scfg.get("allow_repeats", False):
        return base
    return NoRepeatSampler(base, space, seed)


def trial_cap(scfg, space: dict) -> int:
    """Finished trials the study aims at: n_trials, or the number of distinct points when repeats are off."""
    n = int(scfg.n_trials)
    return n if scfg.get("allow_repeats", False) else int(min(n, space_size(space)))


# --------------------------------------------------------------------------------------------------
# Pruners
# --------------------------------------------------------------------------------------------------
PRUNERS = Registry("pruner", key="sweep.pruner.name")
PRUNERS.register("median")(lambda p, rounds: optuna.pruners.MedianPruner(
    n_startup_trials=p.get("n_startup_trials", 2), n_warmup_steps=p.get("n_warmup_steps", 1)))
PRUNERS.register("percentile")(lambda p, rounds: optuna.pruners.PercentilePruner(
    p.get("percentile", 25.0), n_startup_trials=p.get("n_startup_trials", 2), n_warmup_steps=p.get("n_warmup_steps", 1)))
PRUNERS.register("hyperband")(lambda p, rounds: optuna.pruners.HyperbandPruner(min_resource=1,
                                                                                max_resource=max(rounds, 1)))
PRUNERS.register("threshold")(lambda p, rounds: optuna.pruners.ThresholdPruner(
    lower=p.get("lower"), upper=p.get("upper"), n_warmup_steps=p.get("n_warmup_steps", 0)))
PRUNERS.register("none")(lambda p, rounds: optuna.pruners.NopPruner())


def make_pruner(pcfg, rounds: int):
    return PRUNERS.get(pcfg.name).obj(pcfg, rounds)
