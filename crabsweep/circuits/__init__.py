"""Circuits: find the units behind a behaviour, steer with them, measure how faithful they are, map their edges.

  discover.py      RelP (prompts + targets) or contrastive discovery → circuit.json (NousResearch format) +
                   units.json;  `crabsweep.discover(session, …)`
  select.py        exclusions (layers, universal and massive-activation units) and the selection rules
  circuit.py       the Circuit value: the reference's JSON, our provenance, unit sets and chain rounds as circuits
  steer.py         multiplier sweeps (and the CAA baseline) with behaviour, specificity and quality measures
  faithfulness.py  the TransluceAI faithfulness/completeness protocol over circuit sizes; chain rounds
  edges.py         unit-to-unit edges, layer flow, hubs, bottlenecks, super weights, DOT
  repl.py          `crabsweep repl`
  prompts.py       prompt sets (data/circuits/*.json);  config.py the config sections;  report.py records/plots
Everything runs on the session's base model (adapter off) through `Session.intervene` / `Session.observe`.
"""
