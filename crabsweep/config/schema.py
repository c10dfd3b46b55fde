"""Typed configuration: every key of every group validated once, when the config is composed.

One mechanism for every type, enum and range error: pydantic models with `Literal` choices and `Field`
ranges, strict types (no silent 1.5 → 1 or "abc" → 0) and unknown keys refused. The fixed sections
(train, eval, round, chain, ensemble) are declared here; each group whose option names a registry entry
(model source, adapter, attribution method, granularity, K policy) is validated by the config model
that entry registered, and the combinations the entries declare (a method's granularities and
adapters, a granularity's modes) are checked here too. The first problem becomes one line:

    bad config: train.lr='abc': Input should be a valid number; fix the override or the YAML
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..circuits.config import CircuitConfig, DiscoverConfig, EdgesConfig, FaithfulnessConfig, SteerConfig
from ..errors import UserError

Finite = Field(allow_inf_nan=False)
CIRCUIT_COMMANDS = ("discover", "steer", "faithfulness", "edges", "repl")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UnitRef(_M):
    """{layer, index} — or, for dictionary features, {dictionary, feature}."""
    layer: int | None = Field(None, ge=0)
    index: int | None = Field(None, ge=0)
    dictionary: str | None = None
    feature: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_form(self):
        if (self.layer is None or self.index is None) == (self.dictionary is None or self.feature is None):
            raise ValueError("a unit is {layer: int, index: int} or {dictionary: name, feature: int}")
        return self


class TrainConfig(_M):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, allow_inf_nan=False)
    lr_min: float = Field(ge=0, allow_inf_nan=False)
    weighted: bool
    shuffle: bool

    @model_validator(mode="after")
    def _lr(self):
        if self.lr_min > self.lr:
            raise ValueError(f"train.lr_min={self.lr_min} must not exceed train.lr={self.lr}")
        return self


class EvalConfig(_M):
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=0)
    mask_off: bool
    collateral_path: str


class RoundConfig(_M):
    suppress: list[UnitRef]
    top: int = Field(ge=1)


class StopConfig(_M):
    final_gap_above: float | None = Field(None, allow_inf_nan=False)
    top1_fraction: float | None = Field(None, gt=0, allow_inf_nan=False)


class ClassifyConfig(_M):
    floor: float = Field(ge=0, allow_inf_nan=False)
    specific_fraction: float = Field(gt=0, le=1)
    collateral_fraction: float = Field(ge=0, allow_inf_nan=False)
    seed_k: float = Field(ge=0, allow_inf_nan=False)
    min_ratios: int = Field(ge=1)
    halving: float = Field(gt=0, le=1)
    similarity_margin: float = Field(ge=0, le=1)


class GateConfig(_M):
    min_task_score: float | None = Field(None, ge=0, le=1)
    max_behaviour_ce: float | None = Field(None, gt=0, allow_inf_nan=False)


class ChainObjective(_M):
    collateral_weight: float = Field(ge=0, allow_inf_nan=False)
    content_weight: float = Field(ge=0, allow_inf_nan=False)


class ChainConfig(_M):
    rounds: int = Field(ge=0)
    inventory: str | None
    control: Literal["last", "every", "none"]
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    recruit_audit: bool = True
    gate: GateConfig
    objective: ChainObjective
    faithfulness: bool = False
    stop: StopConfig
    classify: ClassifyConfig


class Objective(_M):
    metric: str
    direction: Literal["minimize", "maximize"]


class EnsembleConfig(_M):
    rounds: list[int] | None
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None
    combination: Literal["exact", "svd", "linear"]
    svd_rank: int | None = Field(None, ge=1)
    simplex: bool
    low: float = Field(allow_inf_nan=False)
    high: float = Field(allow_inf_nan=False)
    suppression: str
    max_new_tokens: int = Field(ge=1)
    study: bool
    n_trials: int = Field(ge=1)
    depth_steps: int = Field(ge=1)
    seed: int
    objective: Objective
    save: str | None


class RootConfig(_M):
    command: str
    seed: int = Field(ge=0)
    device: str
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "fp64"]
    attn_implementation: Literal["eager", "sdpa"]
    train: TrainConfig
    eval: EvalConfig
    round: RoundConfig
    chain: ChainConfig
    ensemble: EnsembleConfig
    model: dict
    task: dict
    adapter: dict
    attribution: dict
    suppression: dict
    k: dict
    tracker: dict
    sweep: dict
    circuit: CircuitConfig
    discover: DiscoverConfig
    steer: SteerConfig
    faithfulness: FaithfulnessConfig
    edges: EdgesConfig
    dictionary: dict


def _registries() -> dict[str, tuple[Any, str]]:
    """group → (registry, the key naming the entry). Imported late: the registries live with their entries."""
    from ..core.adapters import ADAPTERS
    from ..core.basis import GRANULARITIES
    from ..core.models import SOURCES
    from ..methods import METHODS
    from ..methods.selection import POLICIES
    return {"model": (SOURCES, "source"), "adapter": (ADAPTERS, "name"), "attribution": (METHODS, "name"),
            "suppression": (GRANULARITIES, "granularity"), "k": (POLICIES, "policy")}


def _models() -> dict[str, type[BaseModel]]:
    from ..core.tasks import TaskConfig
    from ..dictionary.config import DictionaryConfig
    from ..sweep.config import SweepConfig
    from ..track.wandb import TrackerConfig
    return {"task": TaskConfig, "tracker": TrackerConfig, "sweep": SweepConfig, "dictionary": DictionaryConfig}


def _fail(e: ValidationError, prefix: str = "") -> UserError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "")
    value = f"={err['input']!r}" if "input" in err and not isinstance(err["input"], dict) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return UserError(f"bad config: {loc}{value}: {msg}; fix the override or the YAML")


def validate(cfg: DictConfig) -> None:
    """Check every key's type and range and every declared combination; raise one UserError."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        RootConfig.model_validate(plain)
    except ValidationError as e:
        raise _fail(e) from None
    entries = {}
    for group, (registry, key) in _registries().items():
        node = plain[group]
        if key not in node:
            raise UserError(f"bad config: {group}.{key} is missing; pick an option with {group}=<name>")
        entry = registry.get(node[key])
        entries[group] = entry
        if entry.config is not None:
            try:
                entry.config.model_validate(node)
            except ValidationError as e:
                raise _fail(e, group) from None
    for group, model in _models().items():
        try:
            model.model_validate(plain[group])
        except ValidationError as e:
            raise _fail(e, group) from None
    method, basis, adapter = entries["attribution"], entries["suppression"], entries["adapter"]
    gran, mode = plain["suppression"]["granularity"], plain["suppression"]["mode"]
    uses_method = plain["command"] not in CIRCUIT_COMMANDS          # the circuit commands train nothing
    if uses_method and method.granularities is not None and gran not in method.granularities:
        raise UserError(f"attribution={method.name} is not defined for suppression={gran}; choose one of "
                        f"{', '.join(e.name for e in _methods_for(gran, adapter.name))}")
    if uses_method and method.adapters is not None and adapter.name not in method.adapters:
        raise UserError(f"attribution={method.name} needs adapter={' or '.join(method.adapters)}, not "
                        f"adapter={adapter.name}; choose another attribution or adapter")
    if plain["chain"].get("faithfulness") and gran == "moe_expert":
        raise UserError("chain.faithfulness mean-ablates per-token features; suppression=moe_expert has none "
                        "(set chain.faithfulness=false)")
    if mode not in basis.obj.modes:
        raise UserError(f"suppression.mode={mode} is not defined for suppression={gran}; choose one of "
                        f"{', '.join(basis.obj.modes)}")


def _methods_for(granularity: str, adapter: str):
    from ..methods import METHODS
    return [e for e in METHODS if (e.granularities is None or granularity in e.granularities)
            and (e.adapters is None or adapter in e.adapters)]
