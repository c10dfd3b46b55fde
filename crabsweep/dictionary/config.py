"""The `dictionary` config section (`crabsweep dictionary train|compare`), validated with the rest."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Positive = Field(gt=0, allow_inf_nan=False)


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CorpusConfig(_M):
    shipped: bool                              # the package's texts and task samples
    prompts: str | None                        # JSON {"prompts": [...]} answered by the model (null: none)
    samples_per_prompt: int = Field(ge=0)
    max_new_tokens: int = Field(ge=0)
    temperature: float = Positive
    batch_size: int = Field(ge=1)
    context: int = Field(ge=2)                 # tokens per sequence at most
    max_tokens: int = Field(ge=1)              # tokens in all at most


class TrainConfig(_M):
    layers: list[int] = Field(min_length=1)    # one layer: an SAE; several: a crosscoder over them
    site: Literal["resid_post", "resid_pre", "mlp_out", "attn_out"]
    width: int = Field(ge=1)
    k: int = Field(ge=1)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float | None = Field(None, gt=0, allow_inf_nan=False)
    warmup: int = Field(ge=0)
    aux_alpha: float = Field(ge=0, allow_inf_nan=False)
    heldout: float = Field(gt=0, le=0.5)
    ce_tokens: int = Field(ge=0)               # held-out tokens for the CE-recovered evaluation
    seed: int
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    out: str | None = None
    corpus: CorpusConfig


class CompareConfig(_M):
    dictionary: str | None = None              # which loaded dictionary (null: the first)
    feature: int | None = Field(None, ge=0)    # null: the feature most raised by `prompts` over `clean_prompts`
    prompts: list[str] = Field(min_length=1)
    clean_prompts: list[str] | None = None     # the counterfactual prompts the output is scored under
    chat: bool
    max_new_tokens: int = Field(ge=1)
    layers: list[int] | None = None            # single_layer layers (null: every dictionary layer)
    scales: list[float] = Field(min_length=1)
    lrs: list[float] = Field(min_length=1)
    steps: int = Field(ge=0)
    propagate: bool
    epsilon: float = Positive                  # "off": re-encoded activation ≤ epsilon × the clean maximum

    @model_validator(mode="after")
    def _pairs(self):
        if self.clean_prompts is not None and len(self.clean_prompts) != len(self.prompts):
            raise ValueError(f"clean_prompts has {len(self.clean_prompts)} entries for {len(self.prompts)} prompts")
        if any(x <= 0 for x in self.lrs):
            raise ValueError("lrs must be positive")
        return self


class DictionaryConfig(_M):
    train: TrainConfig
    compare: CompareConfig
