"""Config composition (Hydra's compose API) and validation with one-line errors.

Every command composes `conf/config.yaml` with its groups (model, task, adapter, attribution,
suppression, …) and the user's `group=option key=value` overrides. The result is resolved and frozen:
no interpolation survives into the saved `.hydra/config.yaml`, so a run can be reproduced from it.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .. import io
from ..errors import UserError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return re.sub(r"\s*Full key: .*$", "", text)


def compose_config(command: str, overrides: list[str]) -> tuple[DictConfig, Path]:
    """Compose, resolve and validate the config for `command`; return it and the run dir."""
    setup_globals()
    if not OmegaConf.has_resolver("crabsweep_root"):
        OmegaConf.register_new_resolver("crabsweep_root", lambda: str(ROOT))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=command):
            cfg = compose(config_name="config", overrides=[f"command={command}", *overrides],
                          return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad config: {_one_line(e)}") from e
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_readonly(cfg, True)
    validate(cfg)
    return cfg, run_dir


def save_config(cfg: DictConfig, overrides: list[str], run_dir: Path) -> None:
    io.write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))
    io.write_text(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def load_saved_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir} holds no .hydra/config.yaml; pass the folder of a crabsweep run")
    return OmegaConf.load(path)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate(cfg: DictConfig) -> None:
    """Cheap checks that turn impossible settings into one clear line before anything loads."""
    t = cfg.train
    _require(int(t.epochs) >= 1, f"train.epochs={t.epochs} must be ≥ 1")
    _require(int(t.batch_size) >= 1, f"train.batch_size={t.batch_size} must be ≥ 1")
    _require(float(t.lr) > 0 and float(t.lr_min) >= 0, "train.lr must be > 0 and train.lr_min ≥ 0")
    _require(float(t.lr_min) <= float(t.lr), f"train.lr_min={t.lr_min} must not exceed train.lr={t.lr}")
    a = cfg.adapter
    _require(int(a.r) >= 1, f"adapter.r={a.r} must be ≥ 1")
    _require(0.0 <= float(a.dropout) < 1.0, f"adapter.dropout={a.dropout} must be in [0, 1)")
    _require(len(a.target_modules) > 0, "adapter.target_modules is empty; list the modules to adapt")
    _require(int(cfg.task.max_prompt_tokens) >= 1, "task.max_prompt_tokens must be ≥ 1")
    _require(int(cfg.eval.max_new_tokens) >= 0, "eval.max_new_tokens must be ≥ 0")
    _require(int(cfg.eval.batch_size) >= 1, "eval.batch_size must be ≥ 1")
    c = cfg.chain
    _require(int(c.rounds) >= 0, f"chain.rounds={c.rounds} must be ≥ 0")
    _require(c.control in ("last", "every", "none"), f"chain.control={c.control} must be last, every or none")
    from ..methods.attribution import POSTHOC, STREAMED
    from ..core.basis import SPACES
    s, a = cfg.suppression, cfg.attribution
    _require(s.granularity in SPACES, f"suppression.granularity={s.granularity} is unknown; choose from {sorted(SPACES)}")
    space = SPACES[s.granularity]
    _require(a.name in STREAMED + POSTHOC, f"attribution={a.name} is unknown; choose from {STREAMED + POSTHOC}")
    _require(a.name in space.supports, f"attribution={a.name} is not defined for suppression={s.granularity}; "
                                       f"choose one of {', '.join(space.supports)}")
    _require(s.mode in space.modes, f"suppression.mode={s.mode} is not defined for suppression={s.granularity}; "
                                    f"choose one of {', '.join(space.modes)}")
    _require(a.get("normalize", "none") in ("none", "layer_zscore"),
             f"attribution.normalize={a.get('normalize')} must be none or layer_zscore")
    if a.name == "integrated_gradients":
        _require(int(a.n_steps) >= 1, f"attribution.n_steps={a.n_steps} must be ≥ 1")


def first_difference(a, b, path: str = "") -> str | None:
    """Where two JSON-like values first differ (`key.sub[3]: x != y`), or None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}{k}: only in {'the first' if k in a else 'the second'}"
            d = first_difference(a[k], b[k], f"{path}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path.rstrip('.')}[{i}].")
            if d:
                return d
        return None if len(a) == len(b) else f"{path.rstrip('.')}: length {len(a)} != {len(b)}"
    return None if a == b else f"{path.rstrip('.')}: {a!r} != {b!r}"


def check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    """A run dir that already holds a config must hold this one (then the command resumes)."""
    path = run_dir / ".hydra" / "config.yaml"
    if path.exists():
        saved = OmegaConf.to_container(OmegaConf.load(path))
        diff = first_difference(saved, OmegaConf.to_container(cfg))
        if diff:
            raise UserError(f"{run_dir} holds a different config ({diff}); use a new hydra.run.dir "
                            "or the same overrides to resume")
