"""Unit sets as JSON: our format and the NousResearch Circuit format (MLP neurons).

Ours:     {"granularity": "mlp_neuron", "units": [{"layer": 3, "index": 17}, ...]}  (or a bare list;
          [layer, index] pairs are accepted too)
Circuit:  {"neurons": {"<layer>,<position>,<neuron>": score, ...}, ...}  — positions are merged.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import io
from ..errors import UserError
from .basis import Unit, unit_json


def load_units(path: str | Path) -> list[Unit]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"unit set '{path}' does not exist; pass a JSON list of units or a Circuit JSON")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from e
    try:
        if isinstance(data, dict) and "neurons" in data:
            return _from_circuit(data["neurons"])
        items = data.get("units") if isinstance(data, dict) else data
        units = [(int(u["layer"]), int(u["index"])) if isinstance(u, dict) else (int(u[0]), int(u[1]))
                 for u in items]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise UserError(f"{path}: expected units as {{\"layer\": int, \"index\": int}} or a Circuit JSON "
                        f"{{\"neurons\": {{\"layer,position,neuron\": score}}}} ({e})") from e
    return list(dict.fromkeys(units))


def _from_circuit(neurons: dict) -> list[Unit]:
    best: dict[Unit, float] = {}
    for key, score in neurons.items():
        layer, _position, neuron = (int(x) for x in str(key).split(","))
        best[(layer, neuron)] = max(best.get((layer, neuron), float("-inf")), abs(float(score)))
    return sorted(best, key=lambda u: (-best[u], u))


def save_units(path: str | Path, units: list[Unit], granularity: str = "mlp_neuron",
               scores: dict[Unit, float] | None = None, fmt: str = "crabsweep") -> None:
    if fmt == "circuit":
        if granularity != "mlp_neuron":
            raise UserError("the Circuit format holds MLP neurons only; export with fmt=crabsweep")
        io.write_json(path, {"neurons": {f"{layer},-1,{index}": (scores or {}).get((layer, index), 1.0)
                                         for layer, index in units}})
    else:
        io.write_json(path, {"granularity": granularity, "units": [unit_json(u) for u in units]})
