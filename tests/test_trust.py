"""Behaviour-level measurements, the round-0 gate, replicates and the method-fidelity options on tiny models,
each against an independent computation."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from crabsweep.cli import main
from crabsweep.core.tasks import SectionsScorer, collate
from crabsweep.io import read_json
from crabsweep.loop.metrics import eval_loss, massive_units, recruit_audit

from .conftest import randomize_lora_b

CHAIN = ["model=tiny_llama", "task=tiny", "tracker=none", "eval.max_new_tokens=4", "train.epochs=2", "train.lr=1e-2",
         "k.k=3", "chain.rounds=2"]


def test_behaviour_and_content_ce_match_per_token_cross_entropy(make_session):
    session = make_session()
    randomize_lora_b(session, std=0.1)
    examples = session.task.train
    assert all(e.behaviour.any() for e in examples)                 # tiny's answers carry a "Verdict:" header
    out = eval_loss(session, examples, batch_size=1)
    beh, con = [], []
    with torch.no_grad():
        for e in examples:
            logits = session.model(input_ids=e.input_ids[None]).logits[0, :-1].float()
            ce = F.cross_entropy(logits, e.labels[1:], ignore_index=-100, reduction="none")
            lab = e.labels[1:] != -100
            b = e.behaviour[1:] & lab
            beh += ce[b].tolist()
            con += ce[lab & ~b].tolist()
    assert out["behaviour"] == pytest.approx(statistics.fmean(beh), rel=1e-5)
    assert out["content"] == pytest.approx(statistics.fmean(con), rel=1e-5)
    assert out["plain"] == pytest.approx(statistics.fmean(beh + con), rel=1e-5)
    header = session.tokenizer.decode(examples[0].input_ids[examples[0].behaviour])
    assert header == "Verdict:"
    assert SectionsScorer(["Verdict"]).spans("x\nVerdict: y") == [(2, 10)]


def test_round_zero_gate_stops_the_chain_with_undetermined(tmp_path):
    run = tmp_path / "gated"
    assert main(["chain", *CHAIN, "task.learned_at=0.75", f"hydra.run.dir={run}"]) == 0
    chain = read_json(run / "chain.json")
    assert [r["round"] for r in chain["rounds"]] == [0]                       # it never trained round 1
    assert chain["stopped"].startswith("round 0 did not learn: held-out task score")
    assert chain["trajectory"]["class"] == "undetermined" and "did not learn" in chain["trajectory"]["reason"]


def test_every_round_records_behaviour_metrics_for_the_suppressed_set_and_its_control(tmp_path):
    run = tmp_path / "run"
    assert main(["chain", *CHAIN, f"hydra.run.dir={run}"]) == 0
    chain = read_json(run / "chain.json")
    r0 = chain["rounds"][0]["metrics"]
    for rec in chain["rounds"][1:]:
        m = rec["metrics"]
        control = read_json(run / f"round_{rec['round']}" / "control" / "record.json")["metrics"]
        for k in ("behaviour_ce", "content_ce", "collateral", "task_score", "damage"):
            assert m[k] is not None and m[f"{k}_random"] == control[k], k
        assert m["behaviour_gap"] == pytest.approx(m["behaviour_ce"] - r0["behaviour_ce"])
        j = (m["behaviour_gap"] - (control["behaviour_ce"] - r0["behaviour_ce"])
             - max(m["collateral"] - control["collateral"], 0)
             - max((m["content_ce"] - r0["content_ce"]) - (control["content_ce"] - r0["content_ce"]), 0))
        assert m["selectivity"] == pytest.approx(j / m["n_suppressed"])
        assert read_json(run / f"round_{rec['round']}" / "control" / "record.json")["generations"]   # it generated
        if rec["round"] == len(chain["rounds"]) - 1:           # the last round's picks are never suppressed
            assert "audit" not in rec["recruits"]
            continue
        audit = rec["recruits"]["audit"]
        assert [a["unit"] for a in audit] == [x["unit"] for x in rec["recruits"]["selected"]]
        assert all(a["peak_over_median"] > 0 and "collateral" in a for a in audit)


def test_replicates_record_mean_spread_and_agreement(tmp_path):
    run = tmp_path / "rep"
    assert main(["chain", *CHAIN, "chain.rounds=1", "chain.seeds=[0,1]", f"hydra.run.dir={run}"]) == 0
    chain = read_json(run / "chain.json")
    seeds = [read_json(run / f"seed_{s}" / "chain.json") for s in (0, 1)]
    assert seeds[0]["rounds"][1]["suppressed"] != seeds[1]["rounds"][1]["suppressed"] or \
        seeds[0]["rounds"][0]["metrics"]["final_loss"] != seeds[1]["rounds"][0]["metrics"]["final_loss"]
    for r in (0, 1):
        vals = [c["rounds"][r]["metrics"]["final_loss"] for c in seeds]
        assert chain["rounds"][r]["metrics"]["final_loss"] == pytest.approx(statistics.fmean(vals))
        assert chain["rounds"][r]["metrics_std"]["final_loss"] == pytest.approx(statistics.pstdev(vals))
    t = chain["trajectory"]
    assert set(t["seeds"]) == {"0", "1"} and t["agreement"] == sum(
        c == t["class"] for c in t["seeds"].values()) / 2 and "seeds agree" in t["reason"]


def test_relp_per_position_drops_bos_and_cna_keeps_the_sign_and_skips_layers(make_session):
    from crabsweep.methods.cna import run as cna_run
    from crabsweep.methods.relp import linearized, run as relp_run
    session = make_session("attribution=relp", "attribution.per_position=true", "attribution.drop_bos=true")
    randomize_lora_b(session, std=0.2)
    ours = relp_run(session, session.cfg.attribution, session.mask([]))[0]["relp"]
    arch = session.loaded.arch
    sites = [arch.down_proj_of(layer) for layer in arch.decoder_layers(session.model)]
    expected = [torch.zeros(s.in_features, dtype=torch.float64) for s in sites]
    kept = {}

    def keep(i):
        def hook(m, a):
            a[0].retain_grad()
            kept[i] = a[0]
        return hook
    hooks = [s.register_forward_pre_hook(keep(i)) for i, s in enumerate(sites)]
    with linearized(session.model, arch):
        for ex in session.task.train:
            logits = session.model(input_ids=ex.input_ids[None]).logits[0, :-1]
            target = ex.labels[1:]
            torch.log_softmax(logits.float(), -1)[target != -100, target[target != -100]].sum().backward()
            for i, x in kept.items():
                per_pos = (x * x.grad)[0, 1:].double()                     # positions ≥ 1 (BOS dropped)
                expected[i] += per_pos.abs().max(0).values
    for h in hooks:
        h.remove()
    session.model.zero_grad(set_to_none=True)
    for i in range(len(sites)):
        torch.testing.assert_close(ours[i].double(), expected[i], rtol=1e-4, atol=1e-8)
    session = make_session("attribution=cna", "attribution.skip_layers=[0]")
    randomize_lora_b(session, std=0.2)
    scores, _ = cna_run(session, session.cfg.attribution, session.mask([]))
    assert torch.all(scores["cna"][0] == 0) and torch.all(scores["cna_signed"][0] == 0)
    assert (scores["cna_signed"][1] < 0).any() and (scores["cna_signed"][1] > 0).any()
    torch.testing.assert_close(scores["cna"][1], scores["cna_signed"][1].abs())


def test_universal_filter_reads_raw_text_at_the_last_token(make_session):
    from crabsweep.methods.cna import universal_units
    session = make_session()
    texts = ["The sky is blue.", "Paris is in France.", "One, two, three."]
    ours = set(universal_units(session, top=3, fraction=2 / 3, texts=texts))
    site = session.basis.sites(session.model)[1]
    counts = torch.zeros(64)
    for t in texts:
        ids = torch.tensor(session.tokenizer(t, add_special_tokens=True)["input_ids"])[None]   # raw, no template
        seen = {}
        h = site.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
        with torch.no_grad(), session.adapter.disabled():
            session.model(input_ids=ids)
        h.remove()
        counts[seen["x"][0, -1].abs().topk(3).indices] += 1
    assert {i for g, i in ours if g == 1} == set((counts >= 2).nonzero().flatten().tolist())


def test_integrated_gradients_refines_until_complete_on_residual_dims(make_session):
    from crabsweep.methods.ig import run as ig_run
    session = make_session("suppression=residual_dim", "suppression.layers=[1]", "attribution=integrated_gradients")
    randomize_lora_b(session, std=0.3)
    _, metrics = ig_run(session, session.cfg.attribution, session.mask([(1, 3), (1, 5)]))
    check = metrics["ig_completeness"]
    assert abs(check["ratio"] - 1) <= 0.05 and check["n_steps"] >= 16


def test_massive_activation_units_are_flagged_and_can_be_excluded(make_session):
    session = make_session()
    site = session.basis.sites(session.model)[0]
    # unit (0, 11) made a massive-activation unit: its input is 500 at every position (others are O(0.1))
    h = site.register_forward_pre_hook(lambda m, a: (a[0].index_fill(-1, torch.tensor([11]), 500.0),))
    session.memo.clear()
    found = massive_units(session, 100.0)
    h.remove()
    assert found == [(0, 11)]
    audit = recruit_audit(session, [(0, 11), (1, 2)])
    assert audit[0]["massive"] and not audit[1]["massive"]
