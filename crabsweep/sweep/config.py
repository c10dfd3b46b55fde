"""The `sweep` config group's schema (validated with the rest of the config at compose time)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SamplerConfig(_M):
    name: str
    seed: int = 0


class PrunerConfig(_M):
    name: str
    n_startup_trials: int = Field(2, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    percentile: float = Field(25.0, gt=0, lt=100)
    lower: float | None = None
    upper: float | None = None


class ObjectiveConfig(_M):
    metric: str
    direction: Literal["minimize", "maximize"]


class HeartbeatConfig(_M):
    interval: float = Field(gt=0)
    grace: float = Field(gt=0)
    max_retry: int = Field(ge=0)


class SubmititConfig(_M):
    cluster: Literal["slurm", "local", "debug"]
    timeout_min: int = Field(ge=1)
    max_requeues: int = Field(ge=0)
    cpus_per_task: int = Field(ge=1)
    mem_gb: float | None = Field(None, gt=0)
    gpus_per_node: int | None = Field(None, ge=0)
    partition: str | None = None
    array_parallelism: int | None = Field(None, ge=1)
    additional: dict[str, Any] = {}
    poll_seconds: float = Field(gt=0)


class SweepConfig(_M):
    study: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    dir: str | None = None
    n_trials: int = Field(ge=1)
    workers: int | str
    role: Literal["main", "worker"]
    launcher: str
    storage: str | None = Field(None, min_length=1)
    cache: bool
    allow_repeats: bool
    max_failures: int = Field(ge=1)
    sampler: SamplerConfig
    pruner: PrunerConfig
    objective: ObjectiveConfig
    heartbeat: HeartbeatConfig
    params: dict[str, Any]
    overrides: list[str]
    submitit: SubmititConfig

    @field_validator("workers")
    @classmethod
    def _workers(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("use a positive number of workers or auto")
