"""What a process loads once: the base model with its PEFT wrapper, the task and the unit space.

Rounds never reload the model: each resets the adapter in place and swaps the suppression mask.
"""

from __future__ import annotations

import json
import logging

from omegaconf import OmegaConf

from .models import load_model
from .tasks import load_task, read_task
from ..loop.train import reset_adapter, wrap_with_lora
from .basis import make_space

log = logging.getLogger(__name__)


class Session:
    def __init__(self, cfg):
        self.cfg = cfg
        samples = read_task(cfg.task)                  # validate the data before the slow model load
        self.loaded = load_model(cfg.model, cfg.device, cfg.dtype, cfg.attn_implementation)
        self.task = load_task(cfg.task, self.loaded.tokenizer, bool(cfg.train.weighted), samples)
        self.space = make_space(cfg.suppression, self.loaded)
        self.model = wrap_with_lora(self.loaded.model, cfg.adapter)
        reset_adapter(self.model, int(cfg.seed))       # deterministic from the start, not only per round
        self.space.install(self.model)
        self._means = None
        log.info("task %s: %d train / %d held-out samples; %d %s units", self.task.name, len(self.task.train),
                 len(self.task.heldout), self.space.n_units, self.space.name)

    @staticmethod
    def structure_key(cfg) -> str:
        """What a Session is built from; configs that agree on it can share one (the rest swaps in)."""
        parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "task", "adapter")}
        parts.update(granularity=cfg.suppression.granularity, weighted=bool(cfg.train.weighted), device=cfg.device,
                     dtype=cfg.dtype, attn=cfg.attn_implementation)
        return json.dumps(parts, sort_keys=True)

    def apply_suppression(self, units) -> None:
        """Suppress `units` with the configured mode (zero / mean / multiplier) from now on."""
        s = self.cfg.suppression
        if s.mode == "mean" and self._means is None:
            from ..methods.attribution import unit_means
            self._means = unit_means(self)
        self.space.set_suppression(units, mode=s.mode, scale=float(s.get("scale", 0.0)),
                                   means=self._means if s.mode == "mean" else None)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def device(self):
        return self.loaded.device

    @property
    def pad_id(self) -> int:
        return self.loaded.tokenizer.pad_token_id
