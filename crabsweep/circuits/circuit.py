"""A circuit: scored (layer, position, unit) entries, in the NousResearch neural-steering JSON format.

    {"neurons": {"<layer>,<position>,<neuron>": score, ...}, "prompt": str, "target_token": str,
     "total_logit_diff": float,                                   # the reference's four keys
     "format": "neural-steering-circuit", "version": 1, "crabsweep": {...}}   # our provenance

The reference's loader reads the four keys and ignores the rest; ours also reads a file that has only
`neurons` (defaults: "", "", NaN) and checks every key is three integers and every score a finite number.
`crabsweep` holds what the reference omits: granularity, method, model fingerprint, selection, metric,
the prompts and chat flag, counterfactuals, and what a position means:
  absolute  an index into the formatted prompt (single-prompt RelP; `prompt_tokens` long)
  from_end  −1 is the last prompt token, −2 the one before (several prompts, aligned at their ends)
  last      −1 = the last position (contrastive; the reference's −1)
  none      −1 = no position: the unit's score summed over positions (or a plain unit set)
A unit set (`units.json`, a chain round's recruits or suppressed set) becomes a circuit with position −1
and positions "none".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import io
from ..core.basis import Unit
from ..core.unitsets import load_units, read_json_file, save_units
from ..errors import UserError

FORMAT = "neural-steering-circuit"
Key = tuple[int, int, int]


@dataclass
class Circuit:
    neurons: dict[Key, float]
    prompt: str = ""
    target_token: str = ""
    total_logit_diff: float = math.nan
    meta: dict = field(default_factory=dict)

    # -- views ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.neurons)

    @property
    def positions(self) -> str:
        return self.meta.get("positions") or ("last" if self.neurons and all(p == -1 for _, p, _ in self.neurons)
                                              else "absolute")

    def top(self, k: int | None = None) -> list[tuple[Key, float]]:
        """Entries by |score|, largest first (stable)."""
        ranked = sorted(self.neurons.items(), key=lambda kv: -abs(kv[1]))
        return ranked if k is None else ranked[:k]

    def unit_scores(self) -> dict[Unit, float]:
        """One signed score per unit (its largest-magnitude entry), ordered by |score|."""
        best: dict[Unit, float] = {}
        for (g, _p, i), v in self.top():
            best.setdefault(Unit(g, i), v)
        return best

    def units(self) -> list[Unit]:
        return list(self.unit_scores())

    def by_layer(self) -> dict[int, list[tuple[Key, float]]]:
        out: dict[int, list[tuple[Key, float]]] = {}
        for key, v in self.top():
            out.setdefault(key[0], []).append((key, v))
        return dict(sorted(out.items()))

    def steer_position(self, position: int) -> int | None:
        """Where an entry acts when steering at the circuit's positions (None: every position).
        Negative positions count from the end of the current forward (−1: the token being predicted from)."""
        kind = self.positions
        if kind == "none":
            return None
        if kind == "absolute" and self.meta.get("prompt_tokens"):
            return position - int(self.meta["prompt_tokens"])
        return position

    def subset(self, entries: list[tuple[Key, float]]) -> "Circuit":
        return Circuit(dict(entries), self.prompt, self.target_token, self.total_logit_diff, dict(self.meta))

    # -- files ----------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"neurons": {f"{g},{p},{i}": float(v) for (g, p, i), v in self.neurons.items()},
                "prompt": self.prompt, "target_token": self.target_token,
                "total_logit_diff": float(self.total_logit_diff), "format": FORMAT, "version": 1,
                "crabsweep": self.meta}

    def save(self, path: str | Path) -> Path:
        io.write_json(path, self.to_json())
        return Path(path)

    def save_units(self, path: str | Path, basis) -> Path:
        """crabsweep's unit-set JSON (positions merged) with the circuit's provenance and scores."""
        scores = self.unit_scores()
        meta = {k: v for k, v in self.meta.items() if k not in ("prompts", "counterfactuals")}
        save_units(path, list(scores), basis, meta={**meta, "scores": [float(v) for v in scores.values()]})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        data = read_json_file(path, "circuit")
        if not isinstance(data, dict) or not isinstance(data.get("neurons"), dict):
            raise UserError(f"{path}: not a Circuit JSON (no \"neurons\" object); pass a circuit or a unit set")
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: dict, where: str = "circuit") -> "Circuit":
        neurons: dict[Key, float] = {}
        for key, v in data["neurons"].items():
            parts = str(key).split(",")
            try:
                g, p, i = (int(x) for x in parts)
            except ValueError:
                raise UserError(f"{where}: neuron key {key!r} is not \"layer,position,neuron\" (three integers)") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"{where}: score of {key!r} is {v!r}, not a finite number; fix the file")
            if g < 0 or i < 0:
                raise UserError(f"{where}: neuron key {key!r} has a negative layer or index")
            neurons[(g, p, i)] = float(v)
        tld = data.get("total_logit_diff")
        meta = data.get("crabsweep") if isinstance(data.get("crabsweep"), dict) else {}
        return cls(neurons, str(data.get("prompt") or ""), str(data.get("target_token") or ""),
                   float(tld) if isinstance(tld, (int, float)) and not isinstance(tld, bool) else math.nan, meta)

    @classmethod
    def from_units(cls, units, scores: list[float] | None = None, meta: dict | None = None) -> "Circuit":
        """A unit set as a circuit: position −1 (no position); scores default to the set's order."""
        units = list(dict.fromkeys(Unit(int(g), int(i)) for g, i in units))
        scores = scores if scores is not None and len(scores) == len(units) else [float(len(units) - j)
                                                                                  for j in range(len(units))]
        return cls({(g, -1, i): float(s) for (g, i), s in zip(units, scores)}, meta={"positions": "none", **(meta or {})})


def load_source(path: str | Path, basis=None, which: str = "recruits", round_: int | None = None) -> Circuit:
    """A circuit from a Circuit JSON, a unit set (units.json), or a chain / round folder (its recruits or
    suppressed set; `round_` None: the chain's last round)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _from_chain(path, which, round_)
    data = read_json_file(path, "circuit or unit set")
    if isinstance(data, dict) and isinstance(data.get("neurons"), dict):
        return Circuit.from_json(data, str(path))
    units = load_units(path, basis)
    scores = data.get("scores") if isinstance(data, dict) else None
    meta = {k: data[k] for k in ("method", "granularity") if isinstance(data, dict) and k in data}
    return Circuit.from_units(units, scores if isinstance(scores, list) else None, {**meta, "source": str(path)})


def _from_chain(path: Path, which: str, round_: int | None) -> Circuit:
    if (path / "chain.json").is_file():
        rounds = io.read_json(path / "chain.json")["rounds"]
        if not rounds:
            raise UserError(f"{path}/chain.json has no rounds")
        index = len(rounds) - 1 if round_ is None else round_
        if not 0 <= index < len(rounds):
            raise UserError(f"steer.round={round_}: {path} has rounds 0..{len(rounds) - 1}")
        rec = rounds[index]
    elif (path / "record.json").is_file():
        rec = io.read_json(path / "record.json")
    else:
        raise UserError(f"{path} is a folder without chain.json or record.json; pass a chain or round folder")
    from ..core.basis import unit_from_json
    if which == "suppressed":
        units, scores = [unit_from_json(u) for u in rec["suppressed"]], None
    else:
        sel = rec["recruits"]["selected"]
        units, scores = [unit_from_json(x["unit"]) for x in sel], [float(x["score"]) for x in sel]
    return Circuit.from_units(units, scores, {"source": str(path), "round": rec["round"], "set": which,
                                              "method": rec["recruits"]["method"]})
