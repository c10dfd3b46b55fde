"""Registries: the named, pluggable parts of crabsweep (granularities, adapters, attribution methods,
K policies, scorers, model sources, samplers, pruners, launchers).

An entry is registered where it is defined, with the metadata that validation needs (its config model,
what it supports), so that adding one touches one module:

    METHODS = Registry("attribution method", key="attribution")

    @METHODS.register("grad_norm", kind="streamed", config=GradNormConfig)
    class GradNorm: ...

`Registry.get(name)` raises a one-line `UserError` that lists the known names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UserError


@dataclass
class Entry:
    name: str
    obj: Any
    config: type | None = None                    # a pydantic model validating the group's config
    meta: dict = field(default_factory=dict)

    def __getattr__(self, key: str):
        try:
            return self.__dict__["meta"][key]
        except KeyError as e:
            raise AttributeError(key) from e


class Registry:
    def __init__(self, what: str, key: str | None = None):
        self.what, self.key = what, key           # key: the config group that names an entry
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, config: type | None = None, **meta) -> Callable:
        def add(obj):
            if name in self._entries:
                raise ValueError(f"{self.what} '{name}' is registered twice")
            self._entries[name] = Entry(name, obj, config, meta)
            return obj
        return add

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            where = f"{self.key}=" if self.key else ""
            raise UserError(f"unknown {self.what} '{name}'; choose {where}one of {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(self._entries.values())
