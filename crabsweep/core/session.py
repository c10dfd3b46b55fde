"""What a process loads once — the base model with its adapter, the task and the basis — and the
scopes every computation runs in.

    session = Session(cfg)                       # or crabsweep.load_session(*overrides)
    with session.intervene(session.mask(S)):     # interventions: values applied in a scope
        with session.observe(tap):               # observers: attribution taps
            ...
    with session.adapter.disabled(): ...         # the untouched base model

Rounds never reload the model: each resets the adapter in place. `session.precision()` is the one
context every forward runs in (device and dtype handling live in core/device.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import ExitStack, contextmanager

from omegaconf import OmegaConf

from .adapters import make_adapter
from .basis import Positions, Unit, make_basis
from .device import precision_context
from .interventions import Mask
from .models import load_model
from .tasks import load_task, read_task

log = logging.getLogger(__name__)

# Config subtrees a Session does not depend on: they change between rounds/chains of one session.
SESSION_DENY = ("command", "seed", "train", "eval", "round", "chain", "k", "attribution", "sweep", "tracker",
                "ensemble", "suppression.mode", "suppression.scale", "launcher", "circuit", "discover", "steer",
                "faithfulness", "edges", "dictionary")


def config_key(cfg, deny, extra: dict | None = None) -> str:
    """A hash of the whole resolved config minus the `deny` subtrees (dotted paths), plus `extra`."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for path in deny:
        node, *rest = path.split(".")
        parent = plain
        for part in [node, *rest][:-1]:
            parent = parent.get(part, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            parent.pop(path.split(".")[-1], None)
    payload = json.dumps({"config": plain, **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class Session:
    def __init__(self, cfg):
        self.cfg = cfg
        samples = read_task(cfg.task)                  # validate the data before the slow model load
        self.loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.attn_implementation)
        self.task = load_task(cfg.task, self.loaded.tokenizer, bool(cfg.train.weighted), samples)
        self.adapter = make_adapter(cfg.adapter, self.loaded)
        self.model = self.adapter.wrap(self.loaded.model)
        self.basis = make_basis(cfg.suppression, self.loaded)      # after wrapping: PEFT freezes other weights
        self.adapter.reset(int(cfg.seed))             # deterministic from the start, not only per round
        self._means = None
        self.positional = 0                             # open scopes whose interventions name positions
        self.memo: dict = {}                            # what no round changes (baselines, …), per session
        log.info("task %s: %d train / %d held-out samples; %d %s units; adapter %s", self.task.name,
                 len(self.task.train), len(self.task.heldout), self.basis.n_units, self.basis.name, self.adapter.name)

    @staticmethod
    def structure_key(cfg) -> str:
        """What a Session is built from; configs that agree on it can share one (the rest swaps in)."""
        return config_key(cfg, SESSION_DENY, {"train.weighted": bool(cfg.train.weighted)})

    # -- scopes -------------------------------------------------------------------------------------
    @contextmanager
    def intervene(self, *interventions):
        """Apply interventions (in order, composed) to the model for the duration of the scope."""
        with ExitStack() as stack:
            positions = None
            if any(iv.positions is not None for iv in interventions):
                positions = Positions(self.adapter.n_virtual_tokens)
                stack.callback(positions.attach(self.model, self.loaded.arch.decoder_layers(self.model)).remove)
                self.positional += 1                   # absolute positions: no left-padded batches meanwhile
                stack.callback(lambda: setattr(self, "positional", self.positional - 1))
            for iv in interventions:
                stack.callback(self.basis.apply(self.model, iv, positions).remove)
            yield self

    @contextmanager
    def observe(self, *taps):
        """Call each tap on every site's features (after any active intervention) within the scope."""
        with ExitStack() as stack:
            for tap in taps:
                stack.callback(self.basis.observe(self.model, tap).remove)
            yield self

    def precision(self):
        """The context every forward pass runs in (autocast when the precision setting asks for it)."""
        return precision_context(self.device, self.loaded.dtype)

    # -- values -------------------------------------------------------------------------------------
    def mask(self, units, mode: str | None = None, scale: float | None = None) -> Mask:
        """The suppression of `units` in the configured mode (zero / mean / multiplier)."""
        s = self.cfg.suppression
        mode = mode or s.mode
        units = tuple(Unit(*u) for u in units)
        if mode == "mean" and self._means is None:
            from .observers import as_prompt, mean_activations
            self._means = [m.float() for m in mean_activations(self, [as_prompt(e) for e in self.task.train],
                                                                 "all", adapter=False)]
        scale = s.get("scale", 0.0) if scale is None else scale
        return Mask(units, mode, scale if isinstance(scale, str) else float(scale),   # str: a dictionary's "auto"
                    self._means if mode == "mean" else None)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self):
        return self.loaded.device

    @property
    def pad_id(self) -> int:
        return self.loaded.tokenizer.pad_token_id
