"""Config composition (Hydra's compose API), validation (config/schema.py) and Hydra's flags.

Every command composes `crabsweep/conf/config.yaml` (shipped inside the package) with its groups and
the user's `group=option key=value` overrides, plus any folders of the user's own configs
(`--config-dir DIR`, or `hydra.searchpath=[file:///dir]`). The result is resolved, validated once and
frozen: no interpolation survives into the saved `.hydra/config.yaml`, so a run can be reproduced from it.

Override rules beyond Hydra's: `sweep.params={…}` *replaces* the default search space (Hydra would merge
dicts); a single parameter is set with `sweep.params.<key>=[…]` and removed with `~sweep.params.<key>`.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
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

ROOT = Path(__file__).resolve().parent.parent          # the package: conf/ and data/ live inside it
CONF_DIR = ROOT / "conf"
REPLACE = ("sweep.params", "sweep.submitit.additional")   # dict overrides that replace instead of merging


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return re.sub(r"\s*Full key: .*$", "", text)


def _prepare(overrides: list[str], config_dir: str | None) -> list[str]:
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in REPLACE and "=" in o:
            out += [f"~{key}", f"+{o}"]
        else:
            out.append(o)
    if config_dir is not None:
        d = Path(config_dir).expanduser().resolve()
        if not d.is_dir():
            raise UserError(f"--config-dir {config_dir} is not a folder; pass a folder holding config groups")
        out.append(f"hydra.searchpath=[file://{d}]")
    return out


@contextmanager
def _hydra(command: str):
    setup_globals()
    if not OmegaConf.has_resolver("crabsweep_root"):
        OmegaConf.register_new_resolver("crabsweep_root", lambda: str(ROOT))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=command):
            yield
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad config: {_one_line(e)}") from e
    finally:
        GlobalHydra.instance().clear()


def compose_raw(command: str, overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The composed config with its `hydra` node, unresolved (what `--cfg` prints)."""
    with _hydra(command):
        cfg = compose(config_name="config", overrides=[f"command={command}", *_prepare(overrides, config_dir)],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
    OmegaConf.set_readonly(cfg, False)
    return cfg


def compose_config(command: str, overrides: list[str], config_dir: str | None = None) -> tuple[DictConfig, Path]:
    """Compose, resolve, validate and freeze the config for `command`; return it and the run dir."""
    cfg = compose_raw(command, overrides, config_dir)
    run_dir = Path(OmegaConf.select(cfg, "hydra.run.dir"))
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"bad config: {_one_line(e)}") from e
    OmegaConf.set_readonly(cfg, True)
    from .schema import validate
    validate(cfg)
    return cfg, run_dir


def show_config(command: str, overrides: list[str], what: str, resolve: bool = False, package: str | None = None,
                config_dir: str | None = None) -> str:
    """`--cfg job|hydra|all`: the composed config as YAML; nothing runs, nothing is written."""
    cfg = compose_raw(command, overrides, config_dir)
    if what == "job":
        with open_dict(cfg):
            del cfg["hydra"]
    elif what == "hydra":
        cfg = cfg.hydra
    if package:
        cfg = OmegaConf.select(cfg, package)
        if cfg is None:
            raise UserError(f"--package {package} is not in the config")
        if not isinstance(cfg, DictConfig):
            return f"{cfg}\n"
    if resolve:
        OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def group_options(config_dir: str | None = None) -> dict[str, list[str]]:
    """Config groups and their options (the shipped ones and a --config-dir's)."""
    out: dict[str, set[str]] = {}
    for d in [CONF_DIR] + ([Path(config_dir)] if config_dir else []):
        for g in sorted(p for p in d.iterdir() if p.is_dir()):
            out.setdefault(g.name, set()).update(f.stem for f in g.glob("*.yaml"))
    return {g: sorted(opts) for g, opts in sorted(out.items())}


def _hydra_app(command: str):
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    setup_globals()
    if not OmegaConf.has_resolver("crabsweep_root"):
        OmegaConf.register_new_resolver("crabsweep_root", lambda: str(ROOT))
    search_path = create_config_search_path(str(CONF_DIR))
    GlobalHydra.instance().clear()
    return Hydra.create_main_hydra2(task_name=command, config_search_path=search_path)


def hydra_info(command: str, overrides: list[str], info: str, config_dir: str | None = None) -> None:
    """`--info`: Hydra's own report on the search path, defaults and composed config."""
    app = _hydra_app(command)
    try:
        app.show_info(info, config_name="config", overrides=[f"command={command}", *_prepare(overrides, config_dir)])
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"bad config: {_one_line(e)}") from e
    finally:
        GlobalHydra.instance().clear()


def shell_completion(overrides: list[str], command: str | None = None) -> None:
    """`--shell-completion install=bash|query=bash`: Hydra's completion, command word included."""
    line = os.environ.get("COMP_LINE")
    if any(o.startswith("query=") for o in overrides) and line is not None:
        from ..commands import COMMANDS
        typed = line.split(" ")
        if len(typed) <= 2:                          # completing the command word itself
            print(" ".join(c for c in COMMANDS if c.startswith(typed[-1])))
            return
        command = command or typed[1]
        os.environ["COMP_LINE"] = " ".join([typed[0], *typed[2:]])
    app = _hydra_app(command or "chain")
    import sys
    argv0, sys.argv[0] = sys.argv[0], "crabsweep"       # the completion is for the console script
    try:
        app.shell_completion(config_name="config", overrides=overrides)
    finally:
        sys.argv[0] = argv0
        GlobalHydra.instance().clear()


def expand_multirun(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic sweeper: `a=1,2 b=x,y` → the cross product as lists of overrides."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise UserError(f"bad override: {_one_line(e)}") from e
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def sweep_dir(command: str, overrides: list[str], config_dir: str | None = None) -> Path:
    first = expand_multirun(overrides)[0]
    return Path(OmegaConf.select(compose_raw(command, first, config_dir), "hydra.sweep.dir"))


def save_config(cfg: DictConfig, overrides: list[str], run_dir: Path) -> None:
    from ..redact import redact_config, redact_text
    io.write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(redact_config(cfg)))
    io.write_text(run_dir / ".hydra" / "overrides.yaml",
                  OmegaConf.to_yaml(OmegaConf.create([redact_text(o) for o in overrides])))


def load_saved_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.exists():
        raise UserError(f"{run_dir} holds no .hydra/config.yaml; pass the folder of a crabsweep run")
    try:
        return OmegaConf.load(path)
    except (OmegaConfBaseException, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable config ({type(e).__name__}); pass the folder of a crabsweep run") from e


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
        from ..redact import redact_config
        saved = OmegaConf.to_container(load_saved_config(run_dir))
        diff = first_difference(saved, OmegaConf.to_container(redact_config(cfg)))
        if diff:
            raise UserError(f"{run_dir} holds a different config ({diff}); use a new hydra.run.dir "
                            "or the same overrides to resume")
