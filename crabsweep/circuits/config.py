"""The circuit commands' config sections (conf/config.yaml: circuit, discover, steer, faithfulness, edges).

Each API function takes its section from the session's config and keyword overrides on top, validated
by the same pydantic model the config is (strict types, ranges, unknown keys refused):

    cs.discover(session, method="contrastive", k=100)     # = crabsweep discover discover.method=… discover.k=100
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import UserError

Prob = Field(gt=0, le=1, allow_inf_nan=False)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CircuitConfig(_M):
    prompts: str                                   # a name in data/circuits/, a JSON file, or "task"
    chat: bool | None = None                       # None: the prompt set's own choice


class DiscoverConfig(_M):
    method: Literal["relp", "contrastive"]
    prompt: str | None = None
    target: str | None = None
    counterfactual: str | None = "auto"            # "auto" | None (no counterfactual) | a token string
    metric: Literal["logit_diff", "logprob", "logit"] = "logit_diff"
    positive: list[str] | str | None = None
    negative: list[str] | str | None = None
    contrast: Literal["difference", "standardized"] = "standardized"
    positions: Literal["each", "sum"] = "each"
    aggregate: Literal["mean", "any"] = "mean"
    skip_positions: Literal["first", "bos", "none"] = "first"
    skip_layers: list[int] = [0, 1]
    select: Literal["topk", "threshold", "percentage", "per_layer_topk"] = "topk"
    k: int | None = Field(200, ge=1)
    threshold: float = Prob
    percentage: float = Field(0.005, gt=0, allow_inf_nan=False)
    per_layer_k: int = Field(10, ge=1)
    exclude_universal: bool = True
    universal_top: int = Field(20, ge=1)
    universal_fraction: float = Prob
    exclude_massive: float | None = Field(None, gt=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _check(self):
        if (self.prompt is None) != (self.target is None) and self.method == "relp":
            raise ValueError("discover.prompt and discover.target go together (one prompt and its target)")
        if self.select == "topk" and self.k is None:
            raise ValueError("discover.select=topk needs discover.k")
        return self


class SteerConfig(_M):
    multipliers: list[float] = Field(min_length=1)
    positions: Literal["all", "circuit"] = "all"
    units: Literal["recruits", "suppressed"] = "recruits"
    round: int | None = None
    top: int | None = Field(None, ge=1)
    suppress: str | None = None
    tokens: list[str] = []
    random_controls: int = Field(5, ge=0)
    max_new_tokens: int = Field(24, ge=1)
    caa: bool = False
    caa_layer: int | None = None
    caa_alphas: list[float] = Field([0.0, 2.0, 4.0, 8.0], min_length=1)

    @model_validator(mode="after")
    def _finite(self):
        for name in ("multipliers", "caa_alphas"):
            if any(v != v or abs(v) == float("inf") for v in getattr(self, name)):
                raise ValueError(f"steer.{name} {getattr(self, name)} must be finite numbers")
        return self


class FaithfulnessConfig(_M):
    percentages: list[float] = Field(min_length=1)
    means: Literal["position", "global"] = "position"
    patch: Literal["auto", "nopair"] = "auto"

    @model_validator(mode="after")
    def _range(self):
        if any(not 0 <= p <= 100 for p in self.percentages):
            raise ValueError(f"faithfulness.percentages {self.percentages} must lie in [0, 100]")
        return self


class EdgesConfig(_M):
    targets: int = Field(30, ge=1)
    min_relative: float = Field(1e-3, ge=0, lt=1)
    super_ratio: float = Field(10.0, gt=1, allow_inf_nan=False)
    super_min_targets: int = Field(5, ge=1)
    bottleneck_fraction: float = Prob
    dot_edges: int = Field(50, ge=1)


SECTIONS = {"circuit": CircuitConfig, "discover": DiscoverConfig, "steer": SteerConfig,
            "faithfulness": FaithfulnessConfig, "edges": EdgesConfig}


def options(cfg, section: str, overrides: dict | None = None):
    """The validated section `section` of `cfg` with keyword `overrides` applied on top."""
    node = cfg.get(section) if cfg is not None else None
    base = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
    unknown = set(overrides or {}) - set(SECTIONS[section].model_fields)
    if unknown:
        raise UserError(f"{section} has no option {', '.join(sorted(unknown))}; choose from "
                        f"{', '.join(SECTIONS[section].model_fields)}")
    try:
        return SECTIONS[section].model_validate({**base, **(overrides or {})})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in (section, *err["loc"]))
        raise UserError(f"bad {loc}: {err['msg'].removeprefix('Value error, ')}; fix the value") from None
