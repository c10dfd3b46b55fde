"""A whole round on a tiny model: determinism, learning, records, saved adapter."""

from __future__ import annotations

import json

import pytest
import torch

from crabsweep.loop.round import run_round, save_round
from crabsweep.core.session import Session
from crabsweep.core.basis import unit_from_json

from .conftest import randomize_lora_b, reload_adapter_loss, tiny_cfg


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


def test_batched_generation_equals_one_prompt_at_a_time_and_positional_scopes_stay_exact():
    from crabsweep.core.interventions import Scale
    from crabsweep.loop.metrics import generate_ids

    session = Session(tiny_cfg())
    randomize_lora_b(session)
    prompts = session.task.train + session.task.heldout
    assert len({len(e.prompt_ids) for e in prompts}) > 1          # different lengths: left padding is exercised
    with session.intervene(session.mask([(0, 3), (1, 5)])):
        one = generate_ids(session, prompts, 12, batch_size=1)
        batched = generate_ids(session, prompts, 12, batch_size=4)
    assert [t.tolist() for t in batched] == [t.tolist() for t in one]
    # a scope naming positions cannot be left-padded: generation falls back to one prompt at a time
    calls = []
    real = session.model.generate
    session.model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or real(**kw)
    try:
        with session.intervene(Scale(((0, 1),), 2.0, positions=(1,))):
            generate_ids(session, prompts[:3], 4, batch_size=4)
        assert calls == [1, 1, 1]
        calls.clear()
        generate_ids(session, prompts[:3], 4, batch_size=4)
        assert calls == [3]
    finally:
        del session.model.generate


def test_round_key_uses_the_imported_package_version_not_stale_metadata(tmp_path):
    """importlib.metadata finds whichever crabsweep dist-info comes first on sys.path (the working directory
    first); two sweep workers in different folders then computed different keys for the same round."""
    import subprocess
    import sys

    import crabsweep
    stale = tmp_path / "crabsweep-0.0.1.dist-info"
    stale.mkdir()
    (stale / "METADATA").write_text("Metadata-Version: 2.1\nName: crabsweep\nVersion: 0.0.1\n")
    code = ("import importlib.metadata as m, json; from crabsweep.loop.cache import package_versions; "
            "print(json.dumps([m.version('crabsweep'), package_versions()['crabsweep']]))")
    seen, used = json.loads(subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                                           check=True).stdout)
    assert seen == "0.0.1"                          # the trap is real in that folder
    assert used == crabsweep.__version__
