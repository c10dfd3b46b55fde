"""Content-addressed round cache: a round is a pure function of its inputs, so equal inputs share it.

The key hashes everything a round's result depends on — model and task fingerprints, the adapter,
training, evaluation and suppression configs, the suppressed *set*, the seed, device/dtype and
`ROUND_CODE_VERSION` (bump it whenever round/train/attribution/metrics change what a round computes).
Trials of a sweep that share a prefix (round 0 always, later rounds when K and the ranking agree)
reuse the stored round — record, scores and adapter — instead of retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from .. import io
from .round import RoundResult
from ..core.basis import Unit, unit_from_json

log = logging.getLogger(__name__)

ROUND_CODE_VERSION = "1"


def round_key(session, suppressed: list[Unit], generations: bool) -> str:
    cfg = session.cfg
    plain = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    payload = {
        "version": ROUND_CODE_VERSION,
        "model": session.loaded.fingerprint, "device": str(session.device), "dtype": str(session.loaded.dtype),
        "task": {"files": session.task.files, "heldout": plain(cfg.task.heldout),
                 "max_prompt_tokens": cfg.task.max_prompt_tokens, "scorer": plain(cfg.task.scorer)},
        "adapter": plain(cfg.adapter), "train": plain(cfg.train), "suppression": plain(cfg.suppression),
        "eval": {k: cfg.eval[k] for k in ("batch_size", "max_new_tokens", "mask_off")},
        "top": cfg.round.top, "seed": cfg.seed, "generations": generations,
        "suppressed": sorted([list(u) for u in set(suppressed)]),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class RoundCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def get(self, key: str, index: int, suppressed: list[Unit]) -> RoundResult | None:
        folder = self.root / key
        if not (folder / "record.json").exists():
            self.misses += 1
            log.info("round cache miss %s (round %d)", key[:12], index)
            return None
        self.hits += 1
        log.info("round cache hit %s (round %d)", key[:12], index)
        rec = io.read_json(folder / "record.json")
        flat = load_file(str(folder / "scores.safetensors"))
        scores: dict[str, list[torch.Tensor]] = {}
        for name in sorted(flat, key=lambda n: (n.rsplit(".", 1)[0], int(n.rsplit(".", 1)[1]))):
            scores.setdefault(name.rsplit(".", 1)[0], []).append(flat[name])
        assert {unit_from_json(u) for u in rec["suppressed"]} == set(suppressed)
        return RoundResult(index, list(suppressed), rec["loss_curve"], rec["metrics"], rec["generations"], scores,
                           rec["recruits"], {**rec["timing"], "cache": "hit"}, adapter_dir=folder / "adapter")

    def put(self, key: str, result: RoundResult, session) -> None:
        target = self.root / key
        if target.exists():
            return
        try:
            with io.staged_dir(target, replace=False) as tmp:
                io.write_json(tmp / "record.json", result.record())
                io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
                result.save_adapter(session, tmp / "adapter")
        except OSError as e:   # another worker stored the same key first: theirs is as good as ours
            log.debug("round cache put %s lost a race: %s", key[:12], e)

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses}
