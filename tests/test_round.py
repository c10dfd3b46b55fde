"""A whole round on a tiny model: determinism, learning, records, saved adapter."""

from __future__ import annotations

import json

import pytest
import torch

from crabsweep.loop.round import run_round, save_round
from crabsweep.core.session import Session
from crabsweep.core.basis import unit_from_json

from .conftest import reload_adapter_loss, tiny_cfg


def _same(a, b):
    assert a.curve == b.curve                     # every float of every step, bitwise
    assert a.recruits == b.recruits
    for m in a.scores:
        assert all(torch.equal(x, y) for x, y in zip(a.scores[m], b.scores[m])), m


def test_same_seed_gives_bitwise_identical_rounds_within_and_across_sessions():
    cfg = tiny_cfg("train.epochs=2", "train.lr=1e-2")
    s1 = Session(cfg)
    suppressed = [(0, 1), (1, 2)]
    a = run_round(s1, suppressed)
    _same(a, run_round(s1, suppressed))          # adapter reset in place, same process
    _same(a, run_round(Session(cfg), suppressed))  # fresh model and adapter
    other = run_round(Session(tiny_cfg("train.epochs=2", "train.lr=1e-2", "seed=1")), suppressed)
    assert other.curve != a.curve


def test_round_learns_records_exclude_suppressed_and_adapter_reloads(tmp_path):
    session = Session(tiny_cfg("train.epochs=4", "train.lr=1e-2", "train.batch_size=2"))
    suppressed = [(0, 0), (1, 63)]
    result = run_round(session, suppressed)
    m = result.metrics
    assert m["final_loss"] < m["init_loss"] and m["steps"] == 4
    assert len(result.curve) == 4 and result.curve[-1]["lr"] < result.curve[0]["lr"]
    for ranked in result.recruits.values():
        assert len(ranked) == 10
        assert not {unit_from_json(r["unit"]) for r in ranked} & set(suppressed)
        assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    out = save_round(result, session, tmp_path / "round_0")
    record = json.loads((out / "record.json").read_text())
    assert record["suppressed"] == [{"layer": 0, "index": 0}, {"layer": 1, "index": 63}]
    assert record["metrics"]["final_loss"] == m["final_loss"]

    # the saved adapter loads with plain PEFT on a fresh base and, under the same mask, gives the same loss
    assert reload_adapter_loss(out / "adapter", suppressed) == pytest.approx(m["final_loss"], abs=1e-5)


def test_attention_head_units_round():
    session = Session(tiny_cfg("suppression.granularity=attention_head", "train.epochs=1"))
    assert session.basis.sizes == [4, 4] and session.basis.unit_dim == 8
    result = run_round(session, [(0, 1)])
    assert all(s[0][1] == 0 for s in result.scores.values())
    assert result.scores["grad_x_act"][0].shape == (4,)
