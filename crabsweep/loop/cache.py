"""Content-addressed round cache: a round is a pure function of its inputs, so equal inputs share it.

The key hashes the whole resolved config minus an explicit deny-list (`ROUND_DENY`: what cannot change a
round's result — sweep, tracker, ensemble and chain bookkeeping, K, which streamed method ranks), plus
the round's own inputs: the suppressed *set*, its seed, whether it generates, the model and task
fingerprints, device, dtype, package versions and `ROUND_CODE_VERSION` (bump it whenever round, train,
attribution or metrics code changes what a round computes). A post-hoc attribution method's scores are
cached beside their round under a key of their own config, so a post-hoc chain can reuse a round that a
streamed one trained.

Every entry carries a manifest of sha256 checksums; an entry that fails it (a truncated write, a disk
error) is moved aside to `cache/.corrupt/` and recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from .. import io
from ..core.session import config_key
from ..errors import UserError
from ..methods import METHODS
from .round import RoundResult, posthoc_scores, run_round

log = logging.getLogger(__name__)

ROUND_CODE_VERSION = "4"
ROUND_DENY = ("command", "sweep", "tracker", "ensemble", "chain", "k", "round.suppress", "attribution", "seed",
              "launcher", "hydra", "circuit", "discover", "steer", "faithfulness", "edges", "dictionary")
PACKAGES = ("torch", "transformers", "peft")


def package_versions() -> dict[str, str]:
    """crabsweep's own version from the imported package (installed metadata can be stale, and which copy
    `importlib.metadata` finds depends on the working directory), the libraries' from their metadata."""
    from .. import __version__
    return {"crabsweep": __version__, **{p: version(p) for p in PACKAGES}}


def _file_sha(path) -> str | None:
    p = Path(str(path))
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None


def session_key(session, **extra) -> str:
    """The whole resolved config minus ROUND_DENY, the fingerprints and versions, and `extra`."""
    extra = {"version": ROUND_CODE_VERSION, "packages": package_versions(),
             "model": session.loaded.fingerprint, "task_files": session.task.files,
             "device": str(session.device), "dtype": str(session.loaded.dtype),
             "collateral_text": _file_sha(session.cfg.eval.collateral_path), **extra}
    basis = getattr(session.basis, "fingerprint", None)          # e.g. a dictionary's weight files
    if basis:
        extra["basis"] = basis
    return config_key(session.cfg, ROUND_DENY, extra)


def round_key(session, suppressed, seed: int, generations: bool, mask_off: bool | None = None) -> str:
    return session_key(session, suppressed=sorted([list(map(int, u)) for u in set(map(tuple, suppressed))]),
                       seed=int(seed), generations=bool(generations), mask_off=mask_off)


def posthoc_key(session) -> str:
    return hashlib.sha256(json.dumps(OmegaConf.to_container(session.cfg.attribution, resolve=True),
                                     sort_keys=True).encode()).hexdigest()[:16]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict:
    """Checksums of an entry's files; a round's post-hoc entries (posthoc/) carry manifests of their own."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and p.relative_to(folder).parts[0] != "posthoc"}


def _load_scores(path: Path) -> dict[str, list[torch.Tensor]]:
    flat = load_file(str(path))
    scores: dict[str, list[torch.Tensor]] = {}
    for name in sorted(flat, key=lambda n: (n.rsplit(".", 1)[0], int(n.rsplit(".", 1)[1]))):
        scores.setdefault(name.rsplit(".", 1)[0], []).append(flat[name])
    return scores


class RoundCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def _valid(self, folder: Path) -> bool:
        """An entry is usable only when its manifest matches every file; a bad one is moved aside."""
        try:
            if _manifest(folder) == io.read_json(folder / "manifest.json"):
                return True
        except (OSError, ValueError):
            pass
        aside = self.root / ".corrupt" / f"{folder.name}-{int(time.time())}-{os.getpid()}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(folder, aside)
            log.warning("round cache entry %s failed its checksum; moved to %s and recomputing", folder.name[:12], aside)
        except OSError:
            pass
        return False

    def get(self, key: str, index: int, suppressed, unit_json) -> RoundResult | None:
        folder = self.root / key
        if not (folder / "manifest.json").exists() or not self._valid(folder):
            self.misses += 1
            log.info("round cache miss %s (round %d)", key[:12], index)
            return None
        self.hits += 1
        log.info("round cache hit %s (round %d)", key[:12], index)
        rec = io.read_json(folder / "record.json")
        return RoundResult(index, list(suppressed), rec["loss_curve"], rec["metrics"], rec["generations"],
                           _load_scores(folder / "scores.safetensors"), rec["recruits"],
                           {**rec["timing"], "cache": "hit"}, adapter_dir=folder / "adapter", unit_json=unit_json)

    def put(self, key: str, result: RoundResult, session) -> None:
        target = self.root / key
        if target.exists():
            return
        try:
            with io.staged_dir(target) as tmp:
                io.write_json(tmp / "record.json", result.record())
                io.write_tensors(tmp / "scores.safetensors", result.flat_scores())
                result.save_adapter(session, tmp / "adapter")
                io.write_json(tmp / "manifest.json", _manifest(tmp))
        except OSError as e:   # another worker stored the same key first: theirs is as good as ours
            log.debug("round cache put %s lost a race: %s", key[:12], e)

    def get_posthoc(self, key: str, pkey: str):
        folder = self.root / key / "posthoc" / pkey
        if not (folder / "manifest.json").exists() or not self._valid(folder):
            return None
        return _load_scores(folder / "scores.safetensors"), io.read_json(folder / "metrics.json")

    def put_posthoc(self, key: str, pkey: str, scores: dict, metrics: dict) -> None:
        target = self.root / key / "posthoc" / pkey
        if target.exists():
            return
        try:
            with io.staged_dir(target) as tmp:
                io.write_tensors(tmp / "scores.safetensors",
                                 {f"{m}.{g}": t for m, per in scores.items() for g, t in enumerate(per)})
                io.write_json(tmp / "metrics.json", metrics)
                io.write_json(tmp / "manifest.json", _manifest(tmp))
        except OSError as e:
            log.debug("post-hoc cache put %s lost a race: %s", pkey, e)

    def unit_collateral(self, session) -> "UnitStore":
        """Where each unit's own collateral (recruit audit) is kept for this session's model and mask."""
        return UnitStore(self.root / "units" / session_key(session, purpose="unit_collateral"))

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses}


class UnitStore:
    """One JSON value per unit in a folder: atomic writes, never overwritten (a race writes equal values)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, unit) -> Path:
        return self.folder / f"{'_'.join(str(int(x)) for x in unit)}.json"

    def get(self, unit):
        path = self._path(unit)
        if not path.is_file():
            return None
        try:
            value = io.read_json(path)["value"]
            return float(value)
        except (OSError, ValueError, KeyError, TypeError, UserError):   # damaged: recompute, leave it be
            log.warning("unit store entry %s is damaged; recomputing its value", path)
            return None

    def put(self, unit, value: float) -> None:
        if self._path(unit).exists():
            return
        try:
            io.write_json(self._path(unit), {"unit": [int(x) for x in unit], "value": value})
        except OSError as e:
            log.debug("unit store put %s failed: %s", unit, e)


def cached_round(session, suppressed, index: int, cache: RoundCache | None, seed: int, generations: bool = True,
                 posthoc: bool = True, label: str | None = None, mask_off: bool | None = None) -> RoundResult:
    """`run_round` through the cache (when there is one); post-hoc scores cached under their own config."""
    if cache is None:
        return run_round(session, suppressed, index, generations, seed, posthoc=posthoc, label=label, mask_off=mask_off)
    key = round_key(session, suppressed, seed, generations, mask_off)
    result = cache.get(key, index, suppressed, session.basis.unit_json)
    fresh = result is None
    if fresh:
        result = run_round(session, suppressed, index, generations, seed, posthoc=False, label=label, mask_off=mask_off)
        cache.put(key, result, session)
    if posthoc and METHODS.get(session.cfg.attribution.name).kind == "posthoc":
        pkey = posthoc_key(session)
        stored = cache.get_posthoc(key, pkey)
        if stored is None:
            stored = posthoc_scores(session, result.suppressed, adapter_dir=None if fresh else result.adapter_dir)
            cache.put_posthoc(key, pkey, *stored)
        result.add_scores(*stored, top=int(session.cfg.round.top))
    return result
