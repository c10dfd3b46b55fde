"""The public Python API: what the CLI does, a notebook does — same records, DataFrame views."""

from __future__ import annotations

import json

import crabsweep as cs
from crabsweep.io import read_json
from crabsweep.loop.reproduce import reproduce

TINY = ["model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4", "train.epochs=2", "train.lr=1e-2",
        "k.k=4", "chain.rounds=2", "chain.control=every"]


def test_load_session_run_round_and_chain_write_reproducible_records(tmp_path):
    session = cs.load_session(*TINY)
    result = cs.run_round(session, suppressed=[(0, 1)])
    assert result.metrics["n_suppressed"] == 1 and result.recruits["grad_norm"]
    chain = cs.run_chain(session)                               # no out_dir: a new temporary folder
    assert (chain.dir / ".hydra" / "config.yaml").exists() and (chain.dir / "chain.json").exists()
    report = reproduce(chain.dir, tmp_path / "rerun")           # `crabsweep reproduce` accepts API output
    assert report["identical"], report["first_difference"]
    # DataFrame views equal chain.json
    record = read_json(chain.dir / "chain.json")
    assert list(chain.rounds["round"]) == [0, 1, 2]
    assert list(chain.rounds["final_loss"]) == [r["metrics"]["final_loss"] for r in record["rounds"]]
    rows = chain.recruits
    want = set()
    for rec in record["rounds"]:
        rc = rec["recruits"]
        sel = {(x["unit"]["layer"], x["unit"]["index"]) for x in rc["selected"]}
        want |= {(rec["round"], rc["method"], *u, True) for u in sel}
        for method, ranked in rc["top"].items():       # every top list, its entries marked if they joined S
            want |= {(rec["round"], method, x["unit"]["layer"], x["unit"]["index"],
                      (x["unit"]["layer"], x["unit"]["index"]) in sel) for x in ranked}
    got = {(r.round, r.method, r.layer, r.index, bool(r.selected)) for r in rows.itertuples()}
    assert got == want and len(rows) == len(want)
    ranking = rows[rows.method == record["rounds"][0]["recruits"]["method"]]
    assert int(ranking.selected.sum()) == 4 * 3                 # every selected unit, once
    again = cs.Chain.load(chain.dir)
    assert again.config.k.k == 4 and again.trajectory == record["trajectory"]


def test_study_trials_join_optuna_with_per_round_metrics(tmp_path):
    from crabsweep.cli import main
    study_dir = tmp_path / "api"
    assert main(["sweep", *TINY[:5], "chain.rounds=1", "sweep.pruner.name=none", f"sweep.dir={tmp_path}",
                 "sweep.study=api", "sweep.n_trials=2", "sweep.sampler.name=bruteforce"]) == 0
    study = cs.Study.load(study_dir)
    trials = study.trials
    assert len(trials) == 2 and set(trials.state) == {"COMPLETE"}
    for col in ("value", "params.attribution", "params.k.k", "r0.final_gap", "r1.final_gap", "r1.specificity"):
        assert col in trials.columns, col
    for _, row in trials.iterrows():
        chain = study.chain(int(row["trial"]))
        assert row["r1.final_gap"] == chain.record["rounds"][1]["metrics"]["final_gap"]
        assert row["params.attribution"] == chain.config.attribution.name
