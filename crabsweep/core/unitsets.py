"""Unit sets as JSON: our format and the NousResearch Circuit format (MLP neurons).

Ours:     {"granularity": "mlp_neuron", "units": [{"layer": 3, "index": 17}, ...]}  (or a bare list;
          [layer, index] pairs are accepted too); other bases write their own unit JSON
          (e.g. {"dictionary": ..., "feature": 12}).
Circuit:  {"neurons": {"<layer>,<position>,<neuron>": score, ...}, "prompt", "target_token",
          "total_logit_diff"} — positions are merged when read as a unit set.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import io
from ..errors import UserError
from .basis import Unit, unit_from_json


def read_json_file(path: str | Path, what: str):
    """A UTF-8 JSON file, or a one-line UserError naming the file and the problem."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from e


def load_units(path: str | Path, basis=None) -> list[Unit]:
    data = read_json_file(path, "unit set")
    parse = basis.unit_from_json if basis is not None else unit_from_json
    try:
        if isinstance(data, dict) and "neurons" in data:
            return _from_circuit(data["neurons"])
        items = data.get("units") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise TypeError("no list of units")
        units = [parse(u) for u in items]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: expected units as {{\"layer\": int, \"index\": int}} or a Circuit JSON "
                        f"{{\"neurons\": {{\"layer,position,neuron\": score}}}} ({e})") from e
    return list(dict.fromkeys(units))


def _from_circuit(neurons: dict) -> list[Unit]:
    best: dict[Unit, float] = {}
    for key, score in neurons.items():
        layer, _position, neuron = (int(x) for x in str(key).split(","))
        best[Unit(layer, neuron)] = max(best.get(Unit(layer, neuron), float("-inf")), abs(float(score)))
    return sorted(best, key=lambda u: (-best[u], u))


def save_units(path: str | Path, units: list[Unit], basis=None, scores: dict | None = None, fmt: str = "crabsweep",
               meta: dict | None = None) -> None:
    """Write a unit set: our format (with `meta`, e.g. method and model fingerprint) or a Circuit JSON."""
    name = basis.name if basis is not None else "mlp_neuron"
    if fmt == "circuit":
        if name != "mlp_neuron":
            raise UserError("the Circuit format holds MLP neurons only; export with fmt=crabsweep")
        io.write_json(path, {"neurons": {f"{g},-1,{i}": (scores or {}).get((g, i), 1.0) for g, i in units},
                             "prompt": (meta or {}).get("prompt", ""), "target_token": (meta or {}).get("target_token", ""),
                             "total_logit_diff": float((meta or {}).get("total_logit_diff", 0.0))})
    else:
        as_json = basis.unit_json if basis is not None else (lambda u: {"layer": int(u[0]), "index": int(u[1])})
        io.write_json(path, {"granularity": name, **(meta or {}), "units": [as_json(u) for u in units]})
