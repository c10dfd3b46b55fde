"""Chains on a tiny model: set algebra, resume, reproduce, saved adapters, user errors."""

from __future__ import annotations

import json

import pytest

import crabsweep.loop.chain as chain_mod
from crabsweep.cli import main
from crabsweep.config import first_difference
from crabsweep.errors import UserError
from crabsweep.io import read_json
from crabsweep.loop.reproduce import reproduce
from crabsweep.core.unitsets import load_units

from crabsweep.core.session import Session

from .conftest import reload_adapter_loss, tiny_cfg

CHAIN = ["model=tiny_llama", "task=tiny", "eval.max_new_tokens=4", "tracker=none", "train.epochs=2", "train.lr=1e-2",
         "k.k=5", "chain.rounds=3", "chain.control=every"]


def _chain(tmp_path, name, *extra):
    run = tmp_path / name
    assert main(["chain", *CHAIN, *extra, f"hydra.run.dir={run}"]) == 0
    return run


def _records(run):
    out = []
    for r in range(len(list(run.glob("round_*")))):
        rec = read_json(run / f"round_{r}" / "record.json")
        rec.pop("timing")
        out.append(rec)
    return out


def test_each_round_adds_exactly_the_previous_top_k(tmp_path):
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps({"neurons": {"0,3,7": 0.5, "0,9,7": 0.9, "1,2,11": 0.1}}))   # Circuit format
    run = _chain(tmp_path, "run", f"chain.inventory={inv}")
    chain = read_json(run / "chain.json")
    rounds = chain["rounds"]
    assert [rec["round"] for rec in rounds] == [0, 1, 2, 3]
    assert [read_json(run / f"round_{r}" / "record.json")["round"] for r in range(4)] == [0, 1, 2, 3]
    unit = lambda d: (d["layer"], d["index"])  # noqa: E731
    assert {unit(u) for u in rounds[0]["suppressed"]} == {(0, 7), (1, 11)}
    recruited = []
    for prev, cur in zip(rounds, rounds[1:]):
        added = [unit(x["unit"]) for x in prev["recruits"]["selected"]]
        assert len(added) == 5
        before = [unit(u) for u in prev["suppressed"]]
        assert [unit(u) for u in cur["suppressed"]] == before + added        # S_{r+1} = S_r ∪ top-K, in order
        assert not set(added) & set(before)
        recruited += added
    assert len(recruited) == len(set(recruited))                              # nobody is recruited twice
    for rec in rounds:
        m = rec["metrics"]
        assert m["delta_loss"] == pytest.approx(m["init_loss"] - m["final_loss"])
        assert m["final_gap"] == pytest.approx(m["final_loss"] - rounds[0]["metrics"]["final_loss"])
        assert {"damage", "collateral", "heldout_loss", "top1_score", "layers_with_recruits"} <= set(m)
        assert "specificity" in m and (run / f"round_{rec['round']}" / "control" / "record.json").exists()
        control = read_json(run / f"round_{rec['round']}" / "control" / "record.json")
        layers = lambda us: sorted(u["layer"] for u in us)  # noqa: E731
        assert layers(control["suppressed"]) == layers(rec["suppressed"])    # matched per layer
        assert not {unit(u) for u in control["suppressed"]} & {unit(u) for u in rec["suppressed"]}
    assert chain["trajectory"]["class"] in {"distributed", "single_point", "multiple_solutions", "exhausting", "inconclusive",
                                            "nonspecific_damage", "infrastructure_damage"}
    assert chain["idle"]["total"] == 128 - 2 - 15 - 5 and len(chain["idle"]["per_layer"]) == 2
    assert (run / "chain.png").stat().st_size > 10_000
    final = [unit(u) for u in rounds[3]["suppressed"]] + [unit(x["unit"]) for x in rounds[3]["recruits"]["selected"]]
    assert load_units(run / "units.json") == final                              # export → import round trip
    assert set(load_units(run / "units.circuit.json")) == set(final)
    assert chain["fingerprints"]["model"]["weights"]["state_dict"]
    # every round's adapter loads with plain PEFT and gives the recorded loss under its mask
    cfg_round = rounds[2]
    loss = reload_adapter_loss(run / "round_2" / "adapter", [unit(u) for u in cfg_round["suppressed"]])
    assert loss == pytest.approx(cfg_round["metrics"]["final_loss"], abs=1e-5)


@pytest.mark.parametrize("where", ["training", "control"])
def test_killed_chain_resumes_after_last_complete_round(tmp_path, monkeypatch, caplog, where):
    whole = _chain(tmp_path, "whole")
    name = "cached_round" if where == "training" else "_ensure_control"
    real = getattr(chain_mod, name)

    def dies_in_round_2(session, *args, **kw):
        if args[1] == 2:
            raise KeyboardInterrupt     # Ctrl-C inside round 2's training, or inside its control
        return real(session, *args, **kw)

    monkeypatch.setattr(chain_mod, name, dies_in_round_2)
    cut = tmp_path / "cut"
    assert main(["chain", *CHAIN, f"hydra.run.dir={cut}"]) == 130
    if where == "training":
        assert sorted(p.name for p in cut.glob("round_*")) == ["round_0", "round_1"]
    else:     # the finished round is kept; only its control is missing
        assert sorted(p.name for p in cut.glob("round_*")) == ["round_0", "round_1", "round_2"]
        assert not (cut / "round_2" / "control").exists()
        (cut / "round_2" / ".control.tmp-left-by-sigkill").mkdir()     # what a SIGKILL would leave behind
    (cut / ".round_3.tmp-left-by-sigkill").mkdir()
    (cut / ".round_3.tmp-left-by-sigkill" / "scores.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(chain_mod, name, real)
    caplog.set_level("INFO")
    assert main(["chain", *CHAIN, f"hydra.run.dir={cut}"]) == 0
    assert "resuming" in caplog.text
    assert not list(cut.glob(".round_*")) and not list(cut.glob("round_*/.control.tmp*"))   # leftovers cleaned
    assert first_difference(_records(whole), _records(cut)) is None
    a, b = read_json(whole / "chain.json"), read_json(cut / "chain.json")
    assert first_difference(a["rounds"], b["rounds"]) is None and a["trajectory"] == b["trajectory"]


def test_reproduce_gives_identical_records(tmp_path):
    run = _chain(tmp_path, "run", "chain.rounds=2")
    report = reproduce(run, tmp_path / "again")
    assert report["identical"], report["first_difference"]
    assert report["fingerprint_difference"] is None and report["rounds"] == 3
    # and a tampered record is reported as the first difference
    rec = read_json(run / "round_1" / "record.json")
    rec["loss_curve"][3]["loss"] += 1e-9
    (run / "round_1" / "record.json").write_text(json.dumps(rec))
    report = reproduce(run, tmp_path / "again2")
    assert not report["identical"] and report["first_difference"].startswith("[1].loss_curve[3].loss")
    # it never writes over the run it checks, nor into a folder that holds anything
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(UserError, match="write over the run it checks"):
        reproduce(run, run)
    with pytest.raises(UserError, match="already exists and is not empty"):
        reproduce(run, tmp_path / "again")
    assert sorted(p.name for p in run.rglob("*")) == before


def _exit2(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err


def test_chain_user_errors_exit_2(tmp_path, capsys):
    _exit2(capsys, ["chain", *CHAIN, "k.k=0", f"hydra.run.dir={tmp_path / 'a'}"], "k.k=0: Input should be greater than or equal to 1")
    _exit2(capsys, ["chain", *CHAIN, "k.k=50", f"hydra.run.dir={tmp_path / 'b'}"], "exceeds the 128 units")
    inv = tmp_path / "inv.json"
    inv.write_text(json.dumps([{"layer": 0, "index": 999}]))
    _exit2(capsys, ["chain", *CHAIN, f"chain.inventory={inv}", f"hydra.run.dir={tmp_path / 'c'}"],
           "(layer 0, index 999) is out of range")
    run = _chain(tmp_path, "d", "chain.rounds=1")
    _exit2(capsys, ["chain", *CHAIN, "chain.rounds=1", "k.k=6", f"hydra.run.dir={run}"],
           "holds a different config (k.k: 5 != 6)")
    for name in "abc":
        assert not (tmp_path / name).exists()


def test_recruit_audit_is_computed_once_per_unit_and_shared_through_the_cache(tmp_path, monkeypatch):
    """Each selected recruit's own collateral: one masked pass per unit per cache, whichever chain asks."""
    from crabsweep.loop import metrics
    from crabsweep.loop.cache import RoundCache
    from crabsweep.loop.chain import run_chain as chain_into

    calls = []
    real = metrics.base_loss
    monkeypatch.setattr(metrics, "base_loss", lambda s, ex, units: calls.append(list(units)) or real(s, ex, units))
    cfg = tiny_cfg("chain.rounds=2", "k.k=2", "chain.recruit_audit=true", command="chain")
    cache = RoundCache(tmp_path / "cache")
    first = chain_into(Session(cfg), tmp_path / "a", cache)
    audited = [a for r in first["rounds"] for a in r["recruits"].get("audit", [])]
    assert "audit" not in first["rounds"][-1]["recruits"]          # the last round's picks are never suppressed
    singles = [c for c in calls if len(c) == 1]
    assert len(singles) == len({(a["unit"]["layer"], a["unit"]["index"]) for a in audited}) == len(audited) > 0
    calls.clear()
    second = chain_into(Session(cfg), tmp_path / "b", cache)       # a fresh session: values from the cache
    assert not [c for c in calls if len(c) == 1]
    assert [r["recruits"].get("audit") for r in second["rounds"]] == [r["recruits"].get("audit") for r in first["rounds"]]
    swapped = Session(cfg)                          # a sweep swaps configs into one session: a new mask mode
    unit = [(audited[0]["unit"]["layer"], audited[0]["unit"]["index"])]
    metrics.recruit_audit(swapped, unit)
    calls.clear()
    swapped.cfg = tiny_cfg("chain.rounds=2", "k.k=2", "suppression.mode=mean", command="chain")
    metrics.recruit_audit(swapped, unit)
    assert calls == [unit]                          # recomputed, not the zero-ablation value
    one = audited[0]
    fresh = real(Session(cfg), metrics.baselines(Session(cfg))["generic"], [(one["unit"]["layer"], one["unit"]["index"])])
    assert one["collateral"] == pytest.approx(fresh - metrics.baselines(Session(cfg))["collateral_loss"])
