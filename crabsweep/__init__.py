"""crabsweep: how redundantly is a behaviour encoded in an LLM? Crab Step as an experiment-tracked sweep.

    import crabsweep as cs
    session = cs.load_session("model=tiny_llama", "task=tiny")      # composed exactly like the CLI
    chain = cs.run_chain(session, out_dir="runs/c1")
    chain.rounds, chain.recruits                                    # pandas DataFrames
    with session.intervene(session.mask([(0, 3)]), cs.Scale([(1, 5)], 4.0)):
        ...                                                          # suppress and steer in one scope
    found = cs.discover(session, out_dir="runs/capitals")           # circuits: discover, steer, faithfulness, edges

The names below are imported on first use (PEP 562), so `import crabsweep` stays cheap.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "load_session": "api", "run_round": "api", "run_chain": "api", "Chain": "api", "Study": "api",
    "show": "api", "compare": "api",
    "Session": "core.session", "Unit": "core.basis",
    "Mask": "core.interventions", "Scale": "core.interventions", "Add": "core.interventions",
    "IGPath": "core.interventions",
    "UserError": "errors",
    "discover": "circuits.discover", "steer": "circuits.steer", "faithfulness": "circuits.faithfulness",
    "edges": "circuits.edges", "Circuit": "circuits.circuit",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())


def __dir__():
    return sorted(list(globals()) + __all__)
