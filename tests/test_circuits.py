"""Circuits (crabsweep/circuits): discovery, selection, the reference's JSON format, steering, CAA,
faithfulness, edges and the REPL — each checked against an independent computation on a tiny model."""

from __future__ import annotations

import io as stdio
import json
import math
import re
from typing import NamedTuple

import pytest
import torch

import crabsweep as cs
from crabsweep.circuits.circuit import Circuit, load_source
from crabsweep.circuits.config import options
from crabsweep.circuits.discover import contrastive, discover, relp
from crabsweep.circuits.edges import Graph, edges
from crabsweep.circuits.faithfulness import Protocol, chain_round_faithfulness, faithfulness, position_means
from crabsweep.circuits.prompts import Item, encode, load_prompt_set
from crabsweep.circuits.repl import Repl
from crabsweep.circuits.select import Attribution, select
from crabsweep.circuits.steer import CAA, random_twin, steer, steering
from crabsweep.cli import main
from crabsweep.core.basis import Unit
from crabsweep.core.observers import Capture
from crabsweep.errors import UserError
from crabsweep.methods.relp import linearized

PSET = {"chat": False,
        "prompts": [{"prompt": "ab cd", "target": "e"}, {"prompt": "hello wor", "target": "l", "counterfactual": "x"}],
        "heldout": [{"prompt": "xy z", "target": "q"}],
        "control": [{"prompt": "one two", "target": "t"}],
        "positive": ["AB CD", "HELLO WORLD"], "negative": ["ab cd", "hello world"],
        "patch": ["cd ab", "world hello"]}


@pytest.fixture(scope="module")
def pset(tmp_path_factory):
    path = tmp_path_factory.mktemp("pset") / "tiny_set.json"
    path.write_text(json.dumps(PSET))
    return path


def _tiny(pset) -> list[str]:
    return ["model=tiny_llama", "task=tiny", "tracker=none", f"circuit.prompts={pset}", "discover.skip_layers=[]",
            "discover.exclude_universal=false", "discover.k=12", "steer.max_new_tokens=3", "steer.random_controls=2",
            "steer.multipliers=[0,1,2]", "faithfulness.percentages=[0,10,50,100]", "edges.targets=4"]


@pytest.fixture(scope="module")
def session(pset):
    return cs.load_session(*_tiny(pset), command="discover")


def _sites(session):
    arch = session.loaded.arch
    return [arch.down_proj_of(layer) for layer in arch.decoder_layers(session.model)]


# -- the reference's Circuit JSON -----------------------------------------------------------------------
class NeuronIdx(NamedTuple):
    layer: int
    position: int
    neuron: int


def ref_save(path, neurons, prompt, target_token, total_logit_diff):        # neural-steering Circuit.save
    data = {"neurons": {f"{n.layer},{n.position},{n.neuron}": v for n, v in neurons.items()},
            "prompt": prompt, "target_token": target_token, "total_logit_diff": total_logit_diff}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def ref_load(path):                                                          # neural-steering Circuit.load
    with open(path) as f:
        data = json.load(f)
    neurons = {}
    for key, val in data["neurons"].items():
        layer, position, neuron = key.split(",")
        neurons[NeuronIdx(int(layer), int(position), int(neuron))] = val
    return dict(neurons=neurons, prompt=data["prompt"], target_token=data["target_token"],
                total_logit_diff=data["total_logit_diff"])


def test_reference_circuit_files_round_trip(tmp_path, session, pset):
    neurons = {NeuronIdx(1, 3, 7): -0.5, NeuronIdx(0, -1, 2): 0.25, NeuronIdx(1, 0, 7): 0.75}
    ref_save(tmp_path / "ref.json", neurons, "<|im_start|>user\nQ", " Austin", -2.1)
    ours = Circuit.load(tmp_path / "ref.json")
    assert ours.neurons == {tuple(k): v for k, v in neurons.items()}
    assert (ours.prompt, ours.target_token, ours.total_logit_diff) == ("<|im_start|>user\nQ", " Austin", -2.1)
    assert ours.units() == [Unit(1, 7), Unit(0, 2)]                # by max |score| over positions
    ours.save(tmp_path / "ours.json")
    back = ref_load(tmp_path / "ours.json")
    assert back == dict(neurons=neurons, prompt="<|im_start|>user\nQ", target_token=" Austin", total_logit_diff=-2.1)

    found = discover(session, out_dir=tmp_path / "d")
    ref = ref_load(tmp_path / "d" / "circuit.json")                 # what the reference's loader sees
    assert ref["neurons"] == {NeuronIdx(*k): v for k, v in found.circuit.neurons.items()}
    assert ref["prompt"] == "[2 prompts, agg=mean]" and ref["target_token"] == str(["e", "l"])
    assert math.isclose(ref["total_logit_diff"], found.attribution.metric)
    meta = json.loads((tmp_path / "d" / "circuit.json").read_text())["crabsweep"]
    assert meta["method"] == "relp" and meta["positions"] == "from_end" and meta["model"]["name"] == "tiny_llama"
    units_json = json.loads((tmp_path / "d" / "units.json").read_text())
    assert units_json["method"] == "relp" and units_json["selection"]["select"] == "topk"
    for path in ("circuit.json", "units.json"):                   # both work as a chain's inventory
        chain = cs.load_session(*_tiny(pset), f"chain.inventory={tmp_path / 'd' / path}")
        from crabsweep.loop.chain import plan_chain
        assert list(plan_chain(chain).inventory) == found.circuit.units()


@pytest.mark.parametrize("content, match", [
    ({"neurons": {"1,2": 0.5}}, "three integers"),
    ({"neurons": {"1,2,3": "x"}}, "not a finite number"),
    ({"neurons": {"1,2,3": True}}, "not a finite number"),
    ({"prompt": "p"}, "no \"neurons\""),
])
def test_bad_circuit_files_are_user_errors(tmp_path, content, match):
    (tmp_path / "c.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match=match):
        Circuit.load(tmp_path / "c.json")


def test_circuit_with_only_neurons_gets_defaults(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"neurons": {"2,-1,5": 1.5}}))
    c = Circuit.load(tmp_path / "c.json")
    assert c.prompt == "" and c.target_token == "" and math.isnan(c.total_logit_diff) and c.positions == "last"


# -- selection ------------------------------------------------------------------------------------------
def _brute(entries, rule, **p):
    """entries: [((g, row, i), v)] in (g, row, i) order; the rule by plain sorting."""
    live = [(k, v) for k, v in entries if v != 0]
    ranked = sorted(live, key=lambda kv: -abs(kv[1]))                # stable: keeps (g, row, i) order on ties
    if rule == "topk":
        return ranked[:p["k"]]
    if rule == "threshold":
        total, acc, out = sum(abs(v) for _, v in live), 0.0, []
        for kv in ranked:
            out.append(kv)
            acc += abs(kv[1])
            if acc >= p["threshold"] * total:
                break
        return out
    if rule == "percentage":
        return [kv for kv in ranked if abs(kv[1]) >= p["percentage"] * abs(p["metric"])]
    per_layer = []
    for g in sorted({k[0] for k, _ in live}):
        per_layer += [kv for kv in ranked if kv[0][0] == g][:p["per_layer_k"]]
    return sorted(per_layer, key=lambda kv: -abs(kv[1]))[:p["k"]]


@pytest.mark.parametrize("rule", ["topk", "threshold", "percentage", "per_layer_topk"])
def test_selection_rules_match_brute_force(rule):
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randn(3, 5, generator=gen, dtype=torch.float64).round(decimals=1) for _ in range(3)]
    scores[1][0, :2] = 0.0
    rows = [-3, -2, -1]
    attr = Attribution(scores, rows, "from_end", metric=-4.0)
    p = dict(select=rule, k=7, threshold=0.4, percentage=0.3, per_layer_k=2)
    entries = [((g, rows[r], i), float(s[r, i])) for g, s in enumerate(scores) for r in range(3) for i in range(5)]
    cfg = type("C", (), p)
    got = select(attr, cfg)
    assert got == _brute(entries, rule, metric=-4.0, **p)
    banned = got[0][0]                                              # an excluded unit never takes a slot
    again = select(attr, cfg, exclude={(banned[0], banned[2])})
    assert all((k[0], k[2]) != (banned[0], banned[2]) for k, _ in again)
    expect = _brute([(k, 0.0 if (k[0], k[2]) == (banned[0], banned[2]) else v) for k, v in entries], rule, metric=-4.0, **p)
    assert again == expect


def test_percentage_needs_a_metric():
    attr = Attribution([torch.ones(1, 3, dtype=torch.float64)], [-1], "last", None, {"method": "contrastive"})
    with pytest.raises(UserError, match="no metric"):
        select(attr, type("C", (), dict(select="percentage", percentage=0.1)))


# -- attribution ----------------------------------------------------------------------------------------
def _relp_by_hand(session, ids, target, cf=None):
    """a·∂M/∂a per [T, n] with hooks, an embedding leaf and .backward() — M = logit[t] − logit[cf or best other]."""
    model, acts = session.model, {}
    hooks = [site.register_forward_pre_hook(lambda m, args, g=g: acts.__setitem__(g, args[0]) or args[0].retain_grad())
             for g, site in enumerate(_sites(session))]
    try:
        with session.adapter.disabled(), linearized(model, session.loaded.arch), torch.enable_grad():
            emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[0, -1]
            if cf is None:
                order = logits.argsort(descending=True).tolist()
                cf = order[1] if order[0] == target else order[0]
            (logits[target] - logits[cf]).backward()
    finally:
        for h in hooks:
            h.remove()
    return [(acts[g].grad[0] * acts[g][0]).detach().double() for g in sorted(acts)], cf


def test_relp_scores_match_a_hand_computation(session):
    tok = session.tokenizer
    items = [Item("ab cd", "e"), Item("hello wor", "l", "x")]
    ids = encode(session, [i.prompt for i in items], False)
    first = lambda s: tok.encode(s, add_special_tokens=False)[0]  # noqa: E731
    by_hand = [_relp_by_hand(session, x, first(i.target), first(i.counterfactual) if i.counterfactual else None)
               for x, i in zip(ids, items)]
    params_before = [p.grad for p in session.model.parameters()]
    dcfg = options(session.cfg, "discover", {"skip_positions": "none"})
    attr = relp(session, dcfg, items, False)
    assert all(g is None for g in params_before) and all(p.grad is None for p in session.model.parameters())
    t = max(len(x) for x in ids)
    assert attr.rows == list(range(-t, 0)) and attr.positions == "from_end"
    for g in range(2):                                                  # mean over prompts, aligned at their ends
        expect = torch.zeros(t, attr.scores[g].shape[1], dtype=torch.float64)
        for (per_layer, _cf), x in zip(by_hand, ids):
            expect[t - len(x):] += per_layer[g] / 2
        torch.testing.assert_close(attr.scores[g], expect, rtol=1e-4, atol=1e-7)
    assert attr.meta["counterfactuals"][0] == tok.decode([by_hand[0][1]]) and attr.meta["counterfactuals"][1] == "x"
    first = relp(session, options(session.cfg, "discover", {}), items[:1], False)
    assert first.positions == "absolute" and torch.all(first.scores[0][0] == 0)   # position 0 left out (sink)
    torch.testing.assert_close(first.scores[1][1:], by_hand[0][0][1][1:], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("granularity, site, hook", [
    ("attention_head", lambda arch, layer: arch.o_proj_of(layer), "pre"),
    ("residual_dim", lambda arch, layer: layer, "post"),
])
def test_relp_on_other_granularities(pset, granularity, site, hook):
    extra = ["suppression.layers=[0,1]"] if granularity == "residual_dim" else []
    s = cs.load_session(*_tiny(pset), f"suppression={granularity}", *extra, command="discover")
    arch, acts = s.loaded.arch, {}
    layers = arch.decoder_layers(s.model)
    if hook == "pre":
        hooks = [site(arch, l).register_forward_pre_hook(lambda m, a, g=g: acts.__setitem__(g, a[0]) or a[0].retain_grad())
                 for g, l in enumerate(layers)]
    else:
        hooks = [site(arch, l).register_forward_hook(lambda m, a, o, g=g: acts.__setitem__(g, o[0] if isinstance(o, tuple)
                                                                                       else o) or acts[g].retain_grad())
                 for g, l in enumerate(layers)]
    x = encode(s, ["ab cd"], False)[0]
    target = s.tokenizer.encode("e", add_special_tokens=False)[0]
    with s.adapter.disabled(), linearized(s.model, arch), torch.enable_grad():
        emb = s.model.get_input_embeddings()(x[None]).detach().requires_grad_(True)
        logits = s.model(inputs_embeds=emb).logits[0, -1]
        order = logits.argsort(descending=True).tolist()
        cf = order[1] if order[0] == target else order[0]
        (logits[target] - logits[cf]).backward()
    for h in hooks:
        h.remove()
    attr = relp(s, options(s.cfg, "discover", {"skip_positions": "none"}), [Item("ab cd", "e")], False)
    for g in range(2):
        prod = (acts[g].grad[0] * acts[g].detach()[0]).double()
        expect = prod.reshape(len(x), s.basis.sizes[g], s.basis.unit_dim).sum(-1)
        torch.testing.assert_close(attr.scores[g], expect, rtol=1e-4, atol=1e-7)
    found = discover(s, k=5)
    assert len(found.circuit) == 5 and found.circuit.meta["granularity"] == granularity
    s.basis.check(found.circuit.units())
    one = steer(s, found.circuit, multipliers=[1.0], random_controls=0)
    assert one["rows"][0]["generations"] == one["baseline"]["generations"]


def test_contrastive_is_the_mean_activation_difference(session):
    acts = {}
    hooks = [site.register_forward_pre_hook(lambda m, args, g=g: acts.__setitem__(g, args[0][0, -1].double()))
             for g, site in enumerate(_sites(session))]
    means = []
    with torch.no_grad(), session.adapter.disabled():
        for prompts in (PSET["positive"], PSET["negative"]):
            total = [0, 0]
            for x in encode(session, prompts, False):
                session.model(input_ids=x[None])
                total = [total[g] + acts[g] for g in range(2)]
            means.append([v / len(prompts) for v in total])
    for h in hooks:
        h.remove()
    attr = contrastive(session, PSET["positive"], PSET["negative"], False)
    for g in range(2):
        torch.testing.assert_close(attr.scores[g][0], means[0][g] - means[1][g])
    # standardized: the difference over the pooled deviation of the two lists (floored at 0.1 × its median)
    pos = [torch.stack(v) for v in zip(*(_last_rows(session, x) for x in encode(session, PSET["positive"], False)))]
    neg = [torch.stack(v) for v in zip(*(_last_rows(session, x) for x in encode(session, PSET["negative"], False)))]
    std = contrastive(session, PSET["positive"], PSET["negative"], False, "standardized")
    for g in range(2):
        sd = ((pos[g].var(0) + neg[g].var(0)) / 2).sqrt()
        expected = (pos[g].mean(0) - neg[g].mean(0)) / sd.clamp_min(0.1 * sd[sd > 0].median())
        torch.testing.assert_close(std.scores[g][0], expected)
    assert std.meta["contrast"] == "standardized"
    found = discover(session, method="contrastive", contrast="difference", skip_layers=[1], k=5)
    assert len(found.circuit) == 5 and all(k[0] == 0 and k[1] == -1 for k in found.circuit.neurons)
    with pytest.raises(UserError, match="no metric"):
        discover(session, method="contrastive", select="percentage")


def _last_rows(session, ids):
    """Each site's input at the last position, by a plain forward pre-hook (no crabsweep observer)."""
    acts = {}
    hooks = [site.register_forward_pre_hook(lambda m, args, g=g: acts.__setitem__(g, args[0][0, -1].double()))
             for g, site in enumerate(_sites(session))]
    with torch.no_grad(), session.adapter.disabled():
        session.model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    return [acts[0], acts[1]]


# -- steering -------------------------------------------------------------------------------------------
def _plain_generation(session, text, n):
    ids = encode(session, [text], False)[0][None]
    with torch.no_grad(), session.adapter.disabled():
        out = session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=False, pad_token_id=session.tokenizer.pad_token_id)
    return session.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_multiplier_one_reproduces_unsteered_generation(session):
    circuit = Circuit({(0, -1, 3): 1.0, (1, 1, 5): -2.0, (1, -2, 7): 0.5}, meta={"positions": "from_end"})
    plain = [_plain_generation(session, i["prompt"], 3) for i in PSET["prompts"] + PSET["heldout"]]
    for positions in ("all", "circuit"):
        result = steer(session, circuit, multipliers=[1.0, 0.0], positions=positions, random_controls=0)
        assert [g["text"] for g in result["baseline"]["generations"]] == plain
        assert [g["text"] for g in result["rows"][0]["generations"]] == plain
        assert result["rows"][0]["target_prob"] == result["baseline"]["target_prob"]
    # m = 0 at every position: the targets' probability as zeroing the columns by hand gives it
    zero = {0: [3], 1: [5, 7]}
    hooks = [site.register_forward_pre_hook(lambda m, args, g=g: (args[0].index_fill(-1, torch.tensor(zero[g]), 0.0),))
             for g, site in enumerate(_sites(session))]
    probs = []
    with torch.no_grad(), session.adapter.disabled():
        for item in PSET["prompts"]:
            x = encode(session, [item["prompt"]], False)[0]
            p = session.model(input_ids=x[None]).logits[0, -1].softmax(-1)
            probs.append(float(p[session.tokenizer.encode(item["target"], add_special_tokens=False)[0]]))
    for h in hooks:
        h.remove()
    result = steer(session, circuit, multipliers=[0.0], random_controls=0)
    assert math.isclose(result["rows"][0]["target_prob"], sum(probs) / len(probs), rel_tol=1e-5)


def test_suppress_and_steer_touch_exactly_the_two_sets(session):
    S = [Unit(0, 1), Unit(1, 2)]
    circuit = Circuit({(0, -1, 5): 1.0, (1, -1, 7): 1.0, (1, 2, 9): 1.0}, meta={"positions": "from_end"})
    x = encode(session, ["hello world"], False)[0]
    for positions in ("all", "circuit"):
        raw = {}
        hooks = [site.register_forward_pre_hook(lambda m, args, g=g: raw.__setitem__(g, args[0].clone()))
                 for g, site in enumerate(_sites(session))]
        cap = Capture()
        with torch.no_grad(), session.adapter.disabled(), \
                session.intervene(*steering(session, circuit, 3.0, positions, S)), session.observe(cap):
            session.model(input_ids=x[None])
        for h in hooks:
            h.remove()
        t = len(x)
        for g in range(2):
            changed = (cap.acts[g][0] != raw[g][0])                       # [T, n]
            s_cols = [i for gg, i in S if gg == g]
            t_cols = {i: [p for (gg, p, ii) in circuit.neurons if gg == g and ii == i] for (gg, _, i) in circuit.neurons
                      if gg == g}
            assert torch.all(cap.acts[g][0][:, s_cols] == 0)
            for i, ps in t_cols.items():
                rows = list(range(t)) if positions == "all" else [p % t for p in ps]
                torch.testing.assert_close(cap.acts[g][0][rows, i], 3 * raw[g][0][rows, i])
                other = [r for r in range(t) if r not in rows]
                assert torch.equal(cap.acts[g][0][other, i], raw[g][0][other, i])
            touched = set(changed.any(0).nonzero().flatten().tolist())
            assert touched <= set(s_cols) | set(t_cols) and set(t_cols) <= touched


def test_random_twins_match_layers_and_avoid_the_circuit(session):
    circuit = Circuit({(0, -1, 3): 1.0, (0, -2, 3): 0.5, (0, -1, 4): 1.0, (1, -1, 9): 1.0})
    twin = random_twin(circuit, session.basis.sizes, seed=7, avoid=[Unit(0, 10)])
    assert sorted(k[:2] for k in twin.neurons) == sorted(k[:2] for k in circuit.neurons)
    assert not set(twin.units()) & (set(circuit.units()) | {Unit(0, 10)})
    assert random_twin(circuit, session.basis.sizes, seed=7, avoid=[Unit(0, 10)]).neurons == twin.neurons


def test_caa_adds_the_mean_residual_difference(session):
    caa = CAA(session, PSET["positive"], PSET["negative"], 0, False)
    with torch.no_grad(), session.adapter.disabled():
        def last(prompts):
            return torch.stack([session.model(input_ids=x[None], output_hidden_states=True).hidden_states[1][0, -1]
                                for x in encode(session, prompts, False)]).mean(0)
        torch.testing.assert_close(caa.vector, last(PSET["positive"]) - last(PSET["negative"]), rtol=1e-5, atol=1e-6)
        x = encode(session, ["hello"], False)[0][None]
        before = session.model(input_ids=x, output_hidden_states=True).hidden_states[1]
        layer0, seen = session.loaded.arch.decoder_layers(session.model)[0], []
        with caa.added(2.5):                  # a hook registered after CAA's sees what layer 1 receives
            hook = layer0.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
            session.model(input_ids=x)
            hook.remove()
    torch.testing.assert_close(seen[0], before + 2.5 * caa.vector, rtol=1e-5, atol=1e-5)


def test_steer_writes_records_and_mirrors_them_to_the_tracker(session, tmp_path):
    calls = []

    class Recorder:
        def log_sweep(self, name, rows, x, images, summary):
            calls.append((name, rows, x, images))

        def finish(self, chain, state="finished"):
            calls.append(("finish", chain))
    circuit = Circuit({(0, -1, 3): 1.0, (1, -1, 5): -1.0}, meta={"positions": "last"})
    steer(session, circuit, tmp_path / "s", tracker=Recorder(), multipliers=[0.0, 2.0], random_controls=1)
    (name, rows, x, images), finish = calls
    assert name == "steer" and x == "value" and [r["value"] for r in rows] == [0.0, 2.0] and finish[0] == "finish"
    assert "units/target_prob" in rows[0] and "units/random_target_prob" in rows[0] and images["steer"].exists()
    with pytest.raises(UserError, match="steer.json exists"):
        steer(session, circuit, tmp_path / "s")


# -- faithfulness ---------------------------------------------------------------------------------------
def test_faithfulness_of_everything_is_one_and_of_nothing_zero(session):
    everything = Circuit.from_units(session.basis.units())
    result = faithfulness(session, everything, percentages=[0, 50, 100])
    assert [r["n_units"] for r in result["rows"]] == [0, session.basis.n_units // 2, session.basis.n_units]
    assert result["rows"][0]["faithfulness"] == 0.0 and result["rows"][0]["completeness"] == 1.0
    assert result["rows"][-1]["faithfulness"] == 1.0 and result["rows"][-1]["completeness"] == 0.0
    # F(∅) by hand: every down_proj input replaced by the patch prompts' per-position means (aligned at the end)
    acts = {}
    hooks = [site.register_forward_pre_hook(lambda m, args, g=g: acts.__setitem__(g, args[0][0].clone()))
             for g, site in enumerate(_sites(session))]
    seqs = []
    with torch.no_grad(), session.adapter.disabled():
        for x in encode(session, PSET["patch"], False):
            session.model(input_ids=x[None])
            seqs.append({g: a.clone() for g, a in acts.items()})
    for h in hooks:
        h.remove()
    tok, total = session.tokenizer, 0.0
    for item in PSET["prompts"]:
        x = encode(session, [item["prompt"]], False)[0]
        t = len(x)

        def mean_at(g, back):
            rows = [s[g][-back] for s in seqs if len(s[g]) >= back]
            return torch.stack(rows).mean(0) if rows else torch.cat([s[g] for s in seqs]).mean(0)
        table = {g: torch.stack([mean_at(g, t - j) for j in range(t)]) for g in range(2)}
        hooks = [site.register_forward_pre_hook(lambda m, args, g=g: (table[g][None].to(args[0].dtype),))
                 for g, site in enumerate(_sites(session))]
        with torch.no_grad(), session.adapter.disabled():
            lo = session.model(input_ids=x[None]).logits[0, -1]
        for h in hooks:
            h.remove()
        with torch.no_grad(), session.adapter.disabled():
            clean = session.model(input_ids=x[None]).logits[0, -1]
        target = tok.encode(item["target"], add_special_tokens=False)[0]
        if item.get("counterfactual"):
            cf = tok.encode(item["counterfactual"], add_special_tokens=False)[0]
        else:
            order = clean.argsort(descending=True).tolist()
            cf = order[1] if order[0] == target else order[0]
        total += float(lo[target] - lo[cf])
    assert math.isclose(result["f_empty"], total / 2, rel_tol=1e-4, abs_tol=1e-5)
    assert result["patch"] == "paired"


def test_faithfulness_sweep_from_a_discovery_and_its_position_means(session):
    by_back, overall = position_means(session, ["ab", "abcd"], False)
    assert set(by_back) == set(range(1, len(encode(session, ["abcd"], False)[0]) + 1))   # up to the longest prompt
    assert len(overall) == 2 and overall[0].shape == by_back[1][0].shape
    result = faithfulness(session, None)
    assert [r["percent"] for r in result["rows"]] == [0, 10, 50, 100]
    assert result["n_ranked"] > 0 and result["rows"][0]["faithfulness"] == 0.0
    assert all(math.isfinite(r["faithfulness"]) for r in result["rows"])


def test_chain_round_faithfulness(session):
    full = chain_round_faithfulness(session, session.basis.units())
    assert full["faithfulness"] == 1.0 and full["completeness"] == 0.0
    some = chain_round_faithfulness(session, [Unit(0, 1), Unit(1, 3)])
    assert set(some) == {"faithfulness", "completeness", "faithfulness_f_model", "faithfulness_f_empty",
                         "faithfulness_f_circuit", "faithfulness_f_complement"}
    assert some["faithfulness_f_model"] == full["faithfulness_f_model"]


def test_chain_records_faithfulness_per_round_and_its_sets_steer(tmp_path, pset):
    s = cs.load_session(*_tiny(pset), "chain.rounds=1", "k.k=2", "train.epochs=1", "chain.control=none",
                        "chain.faithfulness=true", "eval.max_new_tokens=2")
    chain = cs.run_chain(s, tmp_path / "chain")
    rounds = chain.rounds
    assert {"faithfulness", "completeness"} <= set(rounds.columns) and len(rounds) == 2
    rec = chain.record["rounds"][1]
    units = [Unit(x["unit"]["layer"], x["unit"]["index"]) for x in rec["recruits"]["selected"]]
    assert math.isclose(rec["metrics"]["faithfulness"], chain_round_faithfulness(s, units)["faithfulness"])
    # a chain round's recruits or suppressed set is a unit set to steer with
    assert load_source(tmp_path / "chain", s.basis, "recruits").units() == units
    assert load_source(tmp_path / "chain", s.basis, "suppressed", 1).units() == \
        [Unit(u["layer"], u["index"]) for u in rec["suppressed"]]
    assert load_source(tmp_path / "chain" / "round_0", s.basis).units() == \
        [Unit(x["unit"]["layer"], x["unit"]["index"]) for x in chain.record["rounds"][0]["recruits"]["selected"]]
    result = steer(s, tmp_path / "chain", multipliers=[0.0], random_controls=1, round=1,
                   suppress=str(tmp_path / "chain" / "round_1"))
    assert result["units"] == 2 and result["suppressed"] == 2
    with pytest.raises(UserError, match="rounds 0..1"):
        steer(s, tmp_path / "chain", round=5)


# -- edges ----------------------------------------------------------------------------------------------
def test_edges_match_a_hand_computation(session):
    circuit = Circuit({(1, -1, 5): 2.0, (0, -1, 3): 1.0, (0, -2, 9): -0.5, (1, -1, 6): 0.1},
                      meta={"positions": "from_end", "prompts": ["hello wor"], "chat": False})
    graph = edges(session, circuit, targets=2, min_relative=0.0)
    x = encode(session, ["hello wor"], False)[0]
    t = len(x)
    expect = {}
    for tgt in [(1, -1, 5), (0, -1, 3)]:
        acts = {}
        hooks = [site.register_forward_pre_hook(lambda m, args, g=g: acts.__setitem__(g, args[0]) or args[0].retain_grad())
                 for g, site in enumerate(_sites(session))]
        with session.adapter.disabled(), linearized(session.model, session.loaded.arch), torch.enable_grad():
            emb = session.model.get_input_embeddings()(x[None]).detach().requires_grad_(True)
            session.model(inputs_embeds=emb)
            acts[tgt[0]][0, t + tgt[1], tgt[2]].backward()
        for h in hooks:
            h.remove()
        for src in circuit.neurons:
            if src[0] < tgt[0]:
                a = acts[src[0]]
                expect[(src, tgt)] = float(a.grad[0, t + src[1], src[2]] * a.detach()[0, t + src[1], src[2]])
    got = {(s, t_): w for s, t_, w in graph.edges}
    assert set(got) == {k for k, v in expect.items() if v != 0}
    for k, w in got.items():
        assert math.isclose(w, expect[k], rel_tol=1e-4, abs_tol=1e-8)
    assert graph.targets == [(1, -1, 5), (0, -1, 3)]


def test_graph_analyses_on_known_edges():
    hub = (0, -1, 1)
    edges_ = [(hub, (2, -1, t), 10.0) for t in range(6)]                         # one source into 6 targets
    edges_ += [((0, -1, s), (2, -1, s), 1.0) for s in range(2, 7)]              # five weak sources, one target each
    edges_ += [((1, -1, s), (2, -1, 0), 1.0 + s) for s in range(5)]            # five into (2, 0)
    edges_ += [((0, -1, 2), (1, -1, t), 0.5) for t in range(5)]                # (0, 2) also feeds layer 1 ...
    edges_ += [((1, -1, 0), (2, -1, t), -1.0) for t in range(1, 6)]            # ... and (1, 0) feeds five
    edges_.sort(key=lambda e: -abs(e[2]))
    g = Graph(edges_, targets=[])
    flow = {(a, b): w for a, b, w in g.layer_flow()}
    assert flow == {(0, 2): 65.0, (1, 2): 15.0 + 5.0, (0, 1): 2.5}
    hubs = g.hubs(3)
    assert hubs["sources"][0] == {"unit": [0, 1], "degree": 6, "weight": 60.0}
    assert hubs["targets"][0]["unit"] == [2, 0] and hubs["targets"][0]["degree"] == 6     # distinct sources
    supers = g.super_weights(ratio=5.0, min_targets=5)
    assert [s["unit"] for s in supers] == [[0, 1]] and supers[0]["targets"] == 6
    # sources with ≥ 5 distinct targets: (0,1) mean |w| 10, (0,2) 3.5/6, (1,0) 6/6 → median 1.0
    assert math.isclose(supers[0]["ratio"], 10.0) and supers[0]["mean"] == 10.0
    necks = [b["unit"] for b in g.bottlenecks(0.1)]
    assert [1, 0] in necks and [0, 1] not in necks                  # (1,0) has in- and out-edges, (0,1) only out
    dot = g.to_dot(top=4)
    assert dot.startswith("digraph circuit {") and dot.count("->") == 4 and "cluster_L0" in dot and "cluster_L2" in dot


# -- the REPL -------------------------------------------------------------------------------------------
def test_repl_script(session, tmp_path):
    (tmp_path / "taken.json").write_text("{}")
    script = "\n".join(["prompt hello wor", 'discover "l"', "top 3", "ablate top2", "amplify L1/N3 3", "sweep 0 1",
                        "multiplier 0", "top 2", f"save {tmp_path / 'c.json'}", f"save {tmp_path / 'c.json'}",
                        f"save {tmp_path / 'taken.json'}", f"load {tmp_path / 'c.json'}", "info", "bogus", "ablate L9/N1",
                        "quit", "prompt never reached"])
    out = stdio.StringIO()
    Repl(session, stdio.StringIO(script + "\n"), out).cmdloop()
    text = out.getvalue()
    assert "circuit> discover \"l\"" in text and "target 'l' vs" in text
    assert re.search(r"2 units × 0: '", text) and re.search(r"1 units × 3: '", text)
    assert text.count("m=0: p(target)") == 1 and text.count("m=1: p(target)") == 1
    assert f"error: {tmp_path / 'taken.json'} exists" in text and "unknown command 'bogus'" in text
    assert "out of range" in text and "never reached" not in text
    assert Circuit.load(tmp_path / "c.json").neurons and "loaded" in text and "multiplier 0" in text


# -- the commands ---------------------------------------------------------------------------------------
def test_commands_end_to_end(tmp_path, pset, capsys, monkeypatch):
    base = _tiny(pset)
    assert main(["discover", *base, f"hydra.run.dir={tmp_path / 'd'}"]) == 0
    circuit = tmp_path / "d" / "circuit.json"
    assert circuit.exists() and (tmp_path / "d" / "units.json").exists() and "relp circuit" in capsys.readouterr().out
    assert main(["steer", str(circuit), *base, "steer.caa=true", "steer.caa_alphas=[0,1]",
                 f"hydra.run.dir={tmp_path / 's'}"]) == 0
    result = json.loads((tmp_path / "s" / "steer.json").read_text())
    assert [r["value"] for r in result["rows"]] == [0, 1, 2] and [r["value"] for r in result["caa"]["rows"]] == [0, 1]
    assert result["rows"][0]["random"]["target_prob"] is not None and (tmp_path / "s" / "steer.png").exists()
    assert "steering on" in capsys.readouterr().out
    assert main(["faithfulness", str(circuit), *base, f"hydra.run.dir={tmp_path / 'f'}"]) == 0
    assert len(json.loads((tmp_path / "f" / "faithfulness.json").read_text())["rows"]) == 4
    assert main(["edges", str(circuit), *base, f"hydra.run.dir={tmp_path / 'e'}"]) == 0
    assert (tmp_path / "e" / "edges.dot").read_text().startswith("digraph") and "layer flow" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", stdio.StringIO("prompt ab c\ntop 2\ninfo\n"))
    assert main(["repl", str(circuit), *base]) == 0
    assert "loaded 12 entries" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["discover", "circuit.prompts=no_such_set"], "neither a shipped set"),
    (["discover", "discover.method=contrastive", "discover.select=percentage"], "no metric"),
    (["discover", "discover.k=0"], "discover.k"),
    (["steer"], "steer needs a circuit"),
    (["steer", "missing.json"], "does not exist"),
    (["steer", "steer.caa=true", "steer.caa_layer=7"], "caa_layer=7"),
])
def test_circuit_user_errors_are_one_line(tmp_path, pset, capsys, argv, match):
    run = tmp_path / "run"
    command, rest = argv[0], argv[1:]
    paths = [a for a in rest if "=" not in a]
    code = main([command, *paths, *_tiny(pset), *[a for a in rest if "=" in a], f"hydra.run.dir={run}"])
    err = capsys.readouterr().err.strip()
    problems = [line for line in err.splitlines() if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert code == 2 and len(problems) == 1 and match in err and "Traceback" not in err, err
    assert not run.exists()


def test_outputs_of_an_earlier_run_are_never_overwritten(tmp_path, pset, capsys):
    run = tmp_path / "run"
    assert main(["discover", *_tiny(pset), f"hydra.run.dir={run}"]) == 0
    before = (run / "circuit.json").read_bytes()
    assert main(["discover", *_tiny(pset), "discover.k=3", f"hydra.run.dir={run}"]) == 2
    assert "circuit.json exists" in capsys.readouterr().err and (run / "circuit.json").read_bytes() == before


def test_shipped_prompt_sets_parse():
    for name in ("capitals", "caps"):
        ps = load_prompt_set(name)
        assert ps.items and ps.control and all(i.target for i in ps.items + ps.control)
    assert load_prompt_set("capitals").patch and load_prompt_set("caps").positive


def test_units_the_discovery_could_not_select_stay_clean(session):
    """With layer 0 skipped (and universal units excluded), the full attributed set is faithful and complete by
    construction: F(∅) ablates only what could have been attributed."""
    found = discover(session, skip_layers=[0], k=5)
    result = faithfulness(session, found, percentages=[0, 100])
    assert result["n_ranked"] <= session.basis.sizes[1]                # nothing of layer 0 is ranked
    empty, full = result["rows"]
    assert empty["faithfulness"] == 0.0 and empty["completeness"] == 1.0
    assert full["faithfulness"] == 1.0 and full["completeness"] == 0.0
    everything = faithfulness(session, Circuit.from_units(session.basis.units()), percentages=[0])
    assert result["f_empty"] != everything["f_empty"]                  # layer 0 kept its clean values
