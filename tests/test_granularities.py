"""Every granularity × attribution method against independent brute-force computations (tiny models)."""

from __future__ import annotations

import pytest
import torch

from crabsweep.core.models import load_model
from crabsweep.methods.cna import run as cna_run
from crabsweep.methods.ig import integrated_gradients
from crabsweep.methods.relp import HalfProduct, linearized, run as relp_run
from crabsweep.methods.streamed import Recorder
from crabsweep.core.session import Session
from crabsweep.core.tasks import collate
from crabsweep.loop.train import token_losses

from .conftest import merged_base, randomize_lora_b, tiny_cfg


def _step(session, batches, suppressed):
    rec = Recorder(session)
    try:
        with session.intervene(session.mask(suppressed)), session.observe(rec):
            for batch in batches:
                session.model.zero_grad(set_to_none=True)
                token_losses(session.model, batch, session.device)[0].backward()
                rec.end_step()
    finally:
        session.model.zero_grad(set_to_none=True)
    return rec.scores(set(suppressed))


def _batches(session):
    ex = session.task.train
    return [collate(ex[:1], session.pad_id), collate(ex[1:], session.pad_id)]


# -- attention heads -----------------------------------------------------------------------------------
def test_attention_heads_grad_x_act_and_mask(make_session):
    session = make_session("suppression=attention_head")
    randomize_lora_b(session)
    batches = _batches(session)
    ours = _step(session, batches, [(0, 1)])
    model = merged_base(session)
    arch = session.loaded.arch
    o = [arch.o_proj_of(layer) for layer in arch.decoder_layers(model)]
    for m in o:
        m.weight.requires_grad_(True)
    h0 = o[0].register_forward_pre_hook(lambda m, a: (a[0].clone().index_fill_(-1, torch.arange(8, 16), 0.0),))
    expected = [torch.zeros(4, dtype=torch.float64) for _ in o]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        token_losses(model, batch, "cpu")[0].backward()
        for i, m in enumerate(o):
            expected[i] += (m.weight * m.weight.grad).reshape(m.out_features, 4, 8).sum((0, 2)).abs().double()
    h0.remove()
    for i in range(2):
        torch.testing.assert_close(ours["grad_x_act"][i].double(), expected[i], rtol=1e-4, atol=1e-9)
    # the mask zeroes exactly head 1's 8 columns in both paths of the wrapped o_proj
    site = arch.o_proj_of(arch.decoder_layers(session.model)[0])
    seen = {}
    hb = site.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("base", a[0].detach()))
    hl = site.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.__setitem__("lora", a[0].detach()))
    with torch.no_grad():
        token_losses(session.model, batches[0], "cpu")
        clean = dict(seen)
        with session.intervene(session.mask([(0, 1)])):
            token_losses(session.model, batches[0], "cpu")
    hb.remove()
    hl.remove()
    for path in ("base", "lora"):
        assert torch.all(seen[path][..., 8:16] == 0) and torch.all(clean[path][..., 8:16] != 0)
        assert torch.equal(seen[path][..., :8], clean[path][..., :8]) and torch.equal(seen[path][..., 16:],
                                                                                       clean[path][..., 16:])


# -- residual dims -------------------------------------------------------------------------------------
def test_residual_dims_grad_x_act_max_grad_and_mask(make_session):
    session = make_session("suppression=residual_dim", "suppression.layers=[0]", "attribution=grad_x_act")
    assert session.basis.sizes == [32, 0]
    randomize_lora_b(session)
    batches = _batches(session)
    ours = _step(session, batches, [(0, 5)])
    layer0 = session.loaded.arch.decoder_layers(session.model)[0]
    captured = {}                     # brute force on the same model, outside any scope of ours

    def grab(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[..., 5] = 0
        h.retain_grad()
        captured["h"] = h
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = layer0.register_forward_hook(grab)
    gxa = torch.zeros(32, dtype=torch.float64)
    norms = []
    for batch in batches:
        session.model.zero_grad(set_to_none=True)
        token_losses(session.model, batch, "cpu")[0].backward()
        h, g = captured["h"].reshape(-1, 32), captured["h"].grad.reshape(-1, 32)
        gxa += (h * g).sum(0).abs().double()
        norms.append(g.pow(2).sum(0).sqrt().double())
    handle.remove()
    torch.testing.assert_close(ours["grad_x_act"][0].double(), gxa, rtol=1e-4, atol=1e-9)
    expected_max = torch.maximum(norms[0], norms[1])
    expected_max[5] = 0.0
    torch.testing.assert_close(ours["max_grad"][0].double(), expected_max, rtol=1e-4, atol=1e-9)
    assert ours["grad_x_act"][1].numel() == 0


# -- MoE experts ---------------------------------------------------------------------------------------
def test_moe_experts_grad_x_act_matches_the_weight_gradient_formula_and_finite_differences():
    session = Session(tiny_cfg("model=tiny_moe", "suppression=moe_expert", "attribution=grad_x_act", "dtype=fp64"))
    space = session.basis
    batch = collate(session.task.train, session.pad_id)
    ours = _step(session, [batch], [(1, 2)])
    # explicit formula on a fresh model (no parametrization, no hooks): |Σ_h,j W[e,h,j]·∂L/∂W[e,h,j]|
    fresh = load_model(session.cfg.model, "cpu", "fp64")
    experts = [fresh.arch.mlp_of(layer).experts for layer in fresh.arch.decoder_layers(fresh.model)]
    with torch.no_grad():
        experts[1].down_proj[2] = 0.0                      # the suppressed expert, by hand
    weights = [e.down_proj.requires_grad_(True) for e in experts]
    grads = torch.autograd.grad(token_losses(fresh.model, batch, "cpu")[0], weights)
    for layer, (w, g) in enumerate(zip(weights, grads)):
        expected = (w * g).sum((1, 2)).abs().detach()
        torch.testing.assert_close(ours["grad_x_act"][layer].double(), expected, rtol=1e-5, atol=1e-12)  # fp32 scores
        norm = g.pow(2).sum((1, 2)).sqrt()
        if layer == 1:
            norm[2] = 0.0                                      # suppressed: excluded from ranking
        torch.testing.assert_close(ours["grad_norm"][layer].double(), norm, rtol=1e-5, atol=1e-12)
    assert ours["grad_x_act"][1][2] == 0.0
    # and finite differences agree for the most-attributed expert (the RMSNorms run in fp32: coarse)
    w = space.experts[0].parametrizations.down_proj.original
    e = int(ours["grad_x_act"][0].argmax())
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            w[e] *= 1 + sign * 1e-2
            losses.append(float(token_losses(session.model, batch, "cpu")[0]))
            w[e] /= 1 + sign * 1e-2
    assert ours["grad_x_act"][0][e].item() == pytest.approx(abs(losses[0] - losses[1]) / 2e-2, rel=5e-2)
    # masking expert 2 of layer 1 equals zeroing its down_proj slice by hand
    w1 = space.experts[1].parametrizations.down_proj.original
    with torch.no_grad():
        with session.intervene(session.mask([(1, 2)])):
            masked = token_losses(session.model, batch, "cpu")[0]
        saved = w1[2].clone()
        w1[2] = 0
        by_hand = token_losses(session.model, batch, "cpu")[0]
        w1[2] = saved
        clean = token_losses(session.model, batch, "cpu")[0]
    assert torch.equal(masked, by_hand) and not torch.equal(masked, clean)


# -- modes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, scale", [("mean", 0.0), ("multiplier", -1.5)])
def test_mean_and_multiplier_modes_touch_exactly_the_unit(make_session, mode, scale):
    session = make_session(f"suppression.mode={mode}", f"suppression.scale={scale}")
    site = session.loaded.arch.down_proj_of(session.loaded.arch.decoder_layers(session.model)[0])
    seen = {}
    h = site.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach()))
    batch = collate(session.task.train[:1], session.pad_id)
    mask = session.mask([(0, 7)])           # (mean mode: the means are computed here, outside any scope)
    with torch.no_grad():
        token_losses(session.model, batch, "cpu")
        clean = seen["x"]
        with session.intervene(mask):
            token_losses(session.model, batch, "cpu")
    h.remove()
    x = seen["x"]
    if mode == "mean":
        prompt = session.task.train
        acts = []
        hh = site.base_layer.register_forward_pre_hook(lambda m, a: acts.append(a[0][0, :, 7].detach()))
        with torch.no_grad(), session.model.disable_adapter():
            for ex in prompt:
                session.model(input_ids=ex.prompt_ids[None])
        hh.remove()
        expected = torch.cat(acts).double().mean().float()
        assert torch.allclose(x[..., 7], expected.expand_as(x[..., 7]), atol=1e-6)
    else:
        assert torch.allclose(x[..., 7], clean[..., 7] * scale, atol=1e-7)
    keep = [j for j in range(x.shape[-1]) if j != 7]
    assert torch.equal(x[..., keep], clean[..., keep])


# -- integrated gradients, CNA, RelP ------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["mlp_neuron", "attention_head"])
def test_integrated_gradients_completeness_within_5_percent(make_session, granularity):
    session = make_session(f"suppression={granularity}", "attribution=integrated_gradients")
    randomize_lora_b(session, std=0.2)
    mask = session.mask([(0, 1)])
    with session.intervene(mask):
        scores, check = integrated_gradients(session, mask, n_steps=64)
    assert abs(check["loss_actual"] - check["loss_baseline"]) > 1e-3        # a non-trivial path
    assert check["ratio"] == pytest.approx(1.0, abs=0.05)
    assert scores[0][1] == 0.0                                                # suppressed: x = b, no path


def test_cna_equals_adapted_minus_base_mean_activation(make_session):
    session = make_session("attribution=cna")
    randomize_lora_b(session, std=0.2)
    scores, _ = cna_run(session, session.cfg.attribution, session.mask([]))
    ours, signed = scores["cna"], scores["cna_signed"]
    site = session.loaded.arch.down_proj_of(session.loaded.arch.decoder_layers(session.model)[1])
    rows = {}
    h = site.base_layer.register_forward_pre_hook(lambda m, a: rows.setdefault(key[0], []).append(a[0][0].detach()))
    key = [None]
    with torch.no_grad():
        for adapter in (True, False):
            key[0] = adapter
            for ex in session.task.train:
                sel = (ex.labels != -100).nonzero().squeeze(1)
                if adapter:
                    session.model(input_ids=ex.input_ids[None])
                else:
                    with session.model.disable_adapter():
                        session.model(input_ids=ex.input_ids[None])
                rows[adapter][-1] = rows[adapter][-1][sel]
    h.remove()
    delta = torch.cat(rows[True]).double().mean(0) - torch.cat(rows[False]).double().mean(0)
    torch.testing.assert_close(ours[1].double(), delta.abs(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(signed[1].double(), delta, rtol=1e-4, atol=1e-7)      # the sign is kept


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma3"])
def test_relp_forward_unchanged_and_scores_are_grad_times_act_on_the_linearized_model(make_session, model):
    session = make_session(f"model={model}", "attribution=relp")
    randomize_lora_b(session, std=0.2)
    batch = collate(session.task.train[:1], session.pad_id)
    with torch.no_grad():
        plain = session.model(input_ids=batch["input_ids"]).logits
        with linearized(session.model, session.loaded.arch):
            lin = session.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(lin, plain, rtol=1e-5, atol=1e-5)
    ours = relp_run(session, session.cfg.attribution, session.mask([]))[0]["relp"]
    # brute force: retain the down_proj inputs' gradients under the same linearization, no hooks of ours
    arch = session.loaded.arch
    sites = [arch.down_proj_of(layer) for layer in arch.decoder_layers(session.model)]
    kept = {}

    def keep(i):
        def hook(m, a):
            x = a[0]
            x.retain_grad()
            kept.setdefault(i, []).append(x)
        return hook

    handles = [s.register_forward_pre_hook(keep(i)) for i, s in enumerate(sites)]
    expected = [torch.zeros(s.in_features, dtype=torch.float64) for s in sites]
    with linearized(session.model, arch):
        for ex in session.task.train:
            kept.clear()
            logits = session.model(input_ids=ex.input_ids[None]).logits[0, :-1]
            target = ex.labels[1:]
            logp = torch.log_softmax(logits.float(), -1)[target != -100, target[target != -100]].sum()
            logp.backward()
            for i, (x,) in kept.items():
                expected[i] += (x * x.grad).reshape(-1, x.shape[-1]).sum(0).double()
    for h in handles:
        h.remove()
    session.model.zero_grad(set_to_none=True)
    for i in range(len(sites)):
        torch.testing.assert_close(ours[i].double(), expected[i].abs(), rtol=1e-4, atol=1e-8)


def test_half_rule_backward():
    a = torch.tensor([1.5, -2.0], requires_grad=True)
    b = torch.tensor([3.0, 0.5], requires_grad=True)
    g = torch.tensor([0.2, -4.0])
    out = HalfProduct.apply(a, b)
    assert torch.equal(out, a * b)
    out.backward(g)
    assert torch.equal(a.grad, 0.5 * g * b.detach()) and torch.equal(b.grad, 0.5 * g * a.detach())
