"""Dictionary-feature edits on a tiny model, checked against independent computations (plain forward hooks
and the format's maths written out here): no-op identities, the three ablations, steering, clamping,
generation with a KV cache, and attribution through feature activations."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from crabsweep import Add, IGPath, Mask, Scale
from crabsweep.core.observers import Capture, GradientProduct
from crabsweep.core.session import Session
from crabsweep.core.tasks import collate
from crabsweep.dictionary import Ablate, Clamp, Steer
from crabsweep.dictionary.compare import generate_with
from crabsweep.dictionary.formats import save_dictionary
from crabsweep.errors import UserError
from crabsweep.loop.train import token_losses

from .conftest import D, F, K, random_dictionary, tiny_cfg  # noqa: F401


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicts")
    return {"sae": save_dictionary(random_dictionary("sae", [1]), root / "sae"),
            "cc": save_dictionary(random_dictionary("cc", [0, 1], seed=1), root / "cc")}


@pytest.fixture(scope="module")
def sessions(folders):
    return {k: Session(tiny_cfg("suppression=dictionary_feature", f"suppression.path={v}", "attribution=grad_x_act",
                                *(["suppression.method=many_layer"] if k == "cc" else [])))
            for k, v in folders.items()}


# -- independent reference: plain hooks on the decoder layers, the format's maths ---------------------------
def ref_pre(dic, xs):                     # xs [..., L, D]
    return sum((xs[..., i, :] - dic.b_dec[i]) @ dic.W_enc[i] for i in range(dic.n_layers)) + dic.b_enc


def ref_encode(dic, xs):
    pre = ref_pre(dic, xs)
    vals, idx = pre.topk(dic.k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())


def _hook(m, a, out, i, edits, seen):
    x = out[0] if isinstance(out, tuple) else out
    for fn in (edits or {}).get(i, []):
        x = fn(x)
    if seen is not None:
        seen[i] = x.detach().clone()
    return (x, *out[1:]) if isinstance(out, tuple) else x


def plain_hooks(session, edits=None, seen=None):
    """Plain forward hooks on every decoder layer: apply `edits[layer]` to its output, record it in `seen`.
    Registered after any active intervention's hooks, they see (and edit) its output."""
    layers = session.loaded.arch.decoder_layers(session.model)
    return [layer.register_forward_hook(partial(_hook, i=i, edits=edits, seen=seen)) for i, layer in enumerate(layers)]


def run(session, ids, edits=None, extra=()):
    """Logits and the decoder layers' outputs (after any edit)."""
    seen = {}
    with torch.no_grad(), session.intervene(*extra):
        handles = plain_hooks(session, edits, seen)
        try:
            logits = session.model(input_ids=ids).logits
        finally:
            for h in handles:
                h.remove()
    return logits, seen


def stack(seen, dic):
    return torch.stack([seen[s.layer] for s in dic.sites], dim=-2)


def _ids(session, n=2):
    return collate(session.task.train[:n], session.pad_id)["input_ids"]


def active_feature(session, ids):
    dic = session.basis.dictionaries[0]
    _, seen = run(session, ids)
    f = ref_encode(dic, stack(seen, dic))
    return int(f.sum((0, 1)).argmax()), f, seen


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sae", "cc"])
def test_noop_edits_give_bitwise_identical_logits(sessions, kind):
    s = sessions[kind]
    ids = _ids(s)
    base, _ = run(s, ids)
    i, f, _ = active_feature(s, ids)
    never = int((f.sum((0, 1)) == 0).nonzero()[0])
    u = ((0, i),)
    noops = [s.mask([(0, i)], scale=0.0), Ablate(u, "many_layer", 0.0), Ablate(u, "single_layer", 0.0, layer=1),
             Ablate(u, "perturbation", steps=0), Ablate(((0, never),), "many_layer", 1.0), Steer(u, 0.0),
             Scale(u, 1.0)]
    for iv in noops:
        logits, _ = run(s, ids, extra=(iv,))
        assert torch.equal(logits, base), iv
    with s.observe(Capture()):                                   # observing (with gradients) changes nothing
        with torch.enable_grad():
            logits = s.model(input_ids=ids).logits
    assert torch.equal(logits.detach(), base)


def test_single_layer_ablation_of_an_sae(sessions):
    s = sessions["sae"]
    dic = s.basis.dictionaries[0]
    ids = _ids(s)
    i, f, seen = active_feature(s, ids)
    x = seen[1]
    d = dic.W_dec[i, 0]
    # s = 1: exactly x − f_i·d_i at layer 1 (error term kept)
    _, after = run(s, ids, extra=(Ablate(((0, i),), "single_layer", 1.0),))
    torch.testing.assert_close(after[1], x - f[..., i:i + 1] * d, atol=1e-6, rtol=0)
    # scale=auto: the re-encoded activation of feature i at that layer is ≤ 1e-5
    _, after = run(s, ids, extra=(Ablate(((0, i),), "single_layer", "auto"),))
    again = ref_encode(dic, after[1].unsqueeze(-2))[..., i]
    assert f[..., i].max() > 0.1 and again.abs().max() <= 1e-5
    # the suppression config's Mask is the same single-layer ablation (scale from the config: 1.0)
    _, via_mask = run(s, ids, extra=(s.mask([(0, i)]),))
    torch.testing.assert_close(via_mask[1], x - f[..., i:i + 1] * d, atol=1e-6, rtol=0)


def test_single_layer_auto_on_a_crosscoder_turns_the_feature_off(sessions):
    s = sessions["cc"]
    dic = s.basis.dictionaries[0]
    ids = _ids(s)
    i, f, _ = active_feature(s, ids)
    _, after = run(s, ids, extra=(Ablate(((0, i),), "single_layer", "auto", layer=1),))
    assert ref_encode(dic, stack(after, dic))[..., i].abs().max() <= 1e-5 < f[..., i].max()


@pytest.mark.parametrize("kind, propagate", [("sae", True), ("cc", True), ("cc", False)])
def test_perturbation_drives_the_feature_below_epsilon_within_15_steps(sessions, kind, propagate):
    s = sessions[kind]
    dic = s.basis.dictionaries[0]
    ids = _ids(s)
    i, f, clean = active_feature(s, ids)
    logits, after = run(s, ids, extra=(Ablate(((0, i),), "perturbation", lr=0.5, steps=15, propagate=propagate),))
    again = ref_encode(dic, stack(after, dic))[..., i]
    eps = 1e-4 * float(f[..., i].max())
    if propagate or kind == "sae":
        assert again.max() <= eps                                      # ε = 1e-4 × the clean maximum
    else:                                                              # encoder-only δ: later layers move too
        assert again.max() < 0.5 * f[..., i].max()
    if kind == "sae":                      # gradient descent on ½f_i²: δ moves along the encoder direction w_i
        delta = after[1] - clean[1]
        moved = delta.norm(dim=-1) > 0
        cos = torch.nn.functional.cosine_similarity(delta[moved], -dic.W_enc[0, :, i].expand_as(delta[moved]), dim=-1)
        assert moved.any() and cos.min() > 0.999
        assert not moved[f[..., i] == 0].any()                    # tokens where the feature is off are untouched


def test_crosscoder_ablation_equals_an_independent_two_pass(sessions):
    s = sessions["cc"]
    dic = s.basis.dictionaries[0]
    ids = _ids(s)
    i, f, _ = active_feature(s, ids)
    for method, scale, layers in (("many_layer", 1.5, (0, 1)), ("single_layer", 2.0, (0,))):
        manual = {slot: [lambda x, slot=slot: x - scale * f[..., i:i + 1] * dic.W_dec[i, slot]] for slot in layers}
        want, _ = run(s, ids, edits=manual)
        got, _ = run(s, ids, extra=(Ablate(((0, i),), method, scale, layer=layers[0] if len(layers) == 1 else None),))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - run(s, ids)[0]).abs().max() > 1e-3


def test_generation_under_a_crosscoder_edit_leaves_the_kv_cache_consistent(sessions):
    s = sessions["cc"]
    ids = _ids(s, 1)
    i, _, _ = active_feature(s, ids)
    prompts = [ids[0, :12].tolist(), ids[0, :9].tolist()]
    plain = generate_with(s, [], prompts, 6)
    assert generate_with(s, [Ablate(((0, i),), "many_layer", 0.0)], prompts, 6) == plain
    assert generate_with(s, [Ablate(((0, i),), "perturbation", steps=0)], prompts, 6) == plain
    with torch.no_grad(), s.intervene(Ablate(((0, i),), "many_layer", 2.0)):
        out = s.model(input_ids=ids[:, :10], use_cache=True)
    assert out.past_key_values.get_seq_length() == 10                  # the first pass left no entries


@pytest.mark.parametrize("kind", ["sae", "cc"])
def test_feature_attribution_equals_a_finite_difference(sessions, kind):
    s = sessions[kind]
    dic = s.basis.dictionaries[0]
    batch = collate(s.task.train[:2], s.pad_id)
    ids = batch["input_ids"]
    _, f, _ = active_feature(s, ids)
    acc = GradientProduct(s.basis)
    with s.observe(acc):
        _, plain, _ = token_losses(s.model, batch, "cpu")
        plain.backward()
    s.model.zero_grad(set_to_none=True)
    scores = acc.totals[0]
    slots = s.basis.inject_slots(0)
    for i in scores.abs().topk(3).indices.tolist():
        def loss(eps):                       # L with x_l += eps·f_i,t·d_i^(l) at every token (per-token weighting)
            edits = {dic.sites[j].layer: [lambda x, j=j: x + eps * f[..., i:i + 1] * dic.W_dec[i, j]] for j in slots}
            handles = plain_hooks(s, edits)
            try:
                with torch.no_grad():
                    return float(token_losses(s.model, batch, "cpu")[1])
            finally:
                for h in handles:
                    h.remove()
        eps = 1e-2
        fd = (loss(eps) - loss(-eps)) / (2 * eps)
        assert abs(fd - float(scores[i])) <= 2e-2 * abs(fd) + 1e-6, (i, fd, float(scores[i]))


def test_steering_clamping_positions_and_feature_space_add(sessions):
    s = sessions["sae"]
    dic = s.basis.dictionaries[0]
    ids = _ids(s)
    i, f, clean = active_feature(s, ids)
    d = dic.W_dec[i, 0]
    want, _ = run(s, ids, edits={1: [lambda x: x + 2.5 * d]})
    got, _ = run(s, ids, extra=(Steer(((0, i),), 2.5),))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    v = torch.zeros(F)
    v[i] = 2.5
    got_add, _ = run(s, ids, extra=(Add(0, v, 1.0),))
    torch.testing.assert_close(got_add, want, atol=1e-6, rtol=0)
    _, last = run(s, ids, extra=(Steer(((0, i),), 2.5, positions=(-1,)),))
    changed = (last[1] - clean[1]).abs().amax(-1) > 0
    assert changed[:, -1].all() and not changed[:, :-1].any()
    _, clamped = run(s, ids, extra=(Clamp(((0, i),), target=1.5, lr=0.5, steps=15),))
    torch.testing.assert_close(ref_pre(dic, clamped[1].unsqueeze(-2))[..., i], torch.full(ids.shape, 1.5),
                               atol=1e-3, rtol=0)
    _, scaled = run(s, ids, extra=(Scale(((0, i),), 3.0),))       # f_i ← 3·f_i through the decoder
    torch.testing.assert_close(scaled[1], clean[1] + 2.0 * f[..., i:i + 1] * d, atol=1e-6, rtol=0)


def test_units_and_refusals(sessions, folders, tmp_path):
    s, cc = sessions["sae"], sessions["cc"]
    b = s.basis
    assert b.unit_json((0, 5)) == {"dictionary": "sae", "feature": 5} and b.unit_from_json(b.unit_json((0, 5))) == (0, 5)
    assert b.layers_of((0, 5)) == (1,) and cc.basis.layers_of((0, 5)) == (0, 1)
    with pytest.raises(UserError, match="names dictionary 'other'"):
        b.unit_from_json({"dictionary": "other", "feature": 1})
    with pytest.raises(UserError, match="out of range"):
        b.check([(0, F)])
    with pytest.raises(UserError, match="needs a vector of its 64 features"):
        b.edits(Add(0, torch.zeros(3), 1.0))
    with pytest.raises(UserError, match="not defined for dictionary features"):
        b.edits(IGPath(t=0.5))
    with pytest.raises(UserError, match="does not decode to layer 0"):
        b.edits(Ablate(((0, 1),), "single_layer", 1.0, layer=0))
    single = Session(tiny_cfg("suppression=dictionary_feature", f"suppression.path={folders['cc']}"))
    with pytest.raises(UserError, match="needs a layer; set suppression.layer"):
        with single.intervene(single.mask([])):
            pass
    with pytest.raises(UserError, match="use it with suppression=dictionary_feature"):
        mlp = Session(tiny_cfg())
        with mlp.intervene(Ablate(((0, 1),))):
            pass
    wide = save_dictionary(random_dictionary("wide", [5]), tmp_path / "wide")
    with pytest.raises(UserError, match="made for another model"):
        Session(tiny_cfg("suppression=dictionary_feature", f"suppression.path={wide}"))
    with pytest.raises(UserError, match="neither a folder nor a name"):
        Session(tiny_cfg("suppression=dictionary_feature", "suppression.path=no-such-dictionary"))
    assert isinstance(Mask((), "zero"), Mask)
