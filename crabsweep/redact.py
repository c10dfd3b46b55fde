"""Secrets never reach disk or a screen: storage URLs with passwords and token-like values are redacted
in every record, log, report, W&B config and console line.

    redact_text("postgresql://alice:s3cret@db/x")   → "postgresql://alice:***@db/x"
    redact_config(cfg)                               → a copy with every secret-looking value redacted

The real storage URL reaches workers through the environment (`CRABSWEEP_STORAGE`), never argv.
"""

from __future__ import annotations

import logging
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

MASK = "***"
_URL = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*):(?P<pw>[^@/\s]+)@")
_KV = re.compile(r"(?P<key>\b[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*\s*[=:]\s*)(?P<val>[^\s,;&]+)",
                 re.IGNORECASE)
_SECRET_KEY = re.compile(r"password|passwd|secret|token|api[_-]?key", re.IGNORECASE)
_TOKEN = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|wandb_v1_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9]{20,})\b")


def redact_text(text: str) -> str:
    if not isinstance(text, str):
        return text
    text = _URL.sub(lambda m: f"{m['head']}:{MASK}@", text)
    text = _KV.sub(lambda m: f"{m['key']}{MASK}", text)
    return _TOKEN.sub(MASK, text)


def redact(obj, key: str = ""):
    """Redact a JSON-like value: secret-named keys wholesale, strings by pattern."""
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(v, str) and _SECRET_KEY.search(str(k)) else redact(v, str(k)))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return redact_text(obj) if isinstance(obj, str) else obj


def redact_config(cfg: DictConfig | ListConfig):
    return OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message (and drops the args it was built from)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True
