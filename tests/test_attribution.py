"""Attribution scores against independent brute-force computations on a tiny Llama."""

from __future__ import annotations

import torch

from crabsweep.methods import rank
from crabsweep.methods.streamed import Recorder
from crabsweep.core.tasks import collate
from crabsweep.loop.train import token_losses

from .conftest import merged_base, randomize_lora_b

SUPPRESSED = [(0, 3), (0, 17), (1, 5)]


def _recorded_step(session, batches, suppressed=SUPPRESSED):
    """Our pipeline: mask + tap on the PEFT model, one backward per batch, each folded as one step."""
    rec = Recorder(session)
    with session.intervene(session.mask(suppressed)), session.observe(rec):
        for batch in batches:
            session.model.zero_grad(set_to_none=True)
            weighted, _, _ = token_losses(session.model, batch, session.device)
            weighted.backward()
            rec.end_step()
    return rec.scores(set(suppressed))


def _batches(session):
    ex = session.task.train
    return [collate(ex[:1], session.pad_id), collate(ex[1:], session.pad_id)]


def _brute_force(session, batches, suppressed=SUPPRESSED):
    """Merged plain model, mask by index assignment, weight gradients of down_proj."""
    model = merged_base(session)
    arch = session.loaded.arch
    layers = arch.decoder_layers(model)
    downs = [arch.down_proj_of(layer) for layer in layers]
    for d in downs:
        d.weight.requires_grad_(True)

    def masker(layer):
        def hook(_module, args):
            x = args[0].clone()
            for lyr, idx in suppressed:
                if lyr == layer:
                    x[..., idx] = 0
            if x.requires_grad:
                x.retain_grad()
            else:   # nothing trainable upstream (layer 0): make x a leaf that collects its gradient
                x.requires_grad_(True)
            captured[layer] = x
            return (x,)
        return hook

    handles = [d.register_forward_pre_hook(masker(i)) for i, d in enumerate(downs)]
    gxa = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    gnorm = [torch.zeros(d.in_features, dtype=torch.float64) for d in downs]
    for batch in batches:
        captured = {}
        model.zero_grad(set_to_none=True)
        weighted, _, _ = token_losses(model, batch, "cpu")
        weighted.backward()
        for i, d in enumerate(downs):
            gxa[i] += (d.weight * d.weight.grad).sum(0).abs().double()      # Σ_h W[h,j]·∂L/∂W[h,j]
            g = captured[i].grad.reshape(-1, d.in_features)
            gnorm[i] += g.pow(2).sum(0).sqrt().double()
    for h in handles:
        h.remove()
    return gxa, gnorm


def test_grad_x_act_and_grad_norm_match_brute_force(make_session):
    session = make_session()
    randomize_lora_b(session)
    batches = _batches(session)
    ours = _recorded_step(session, batches)
    gxa, gnorm = _brute_force(session, batches)
    for layer in range(len(gxa)):
        torch.testing.assert_close(ours["grad_x_act"][layer].double(), gxa[layer], rtol=1e-4, atol=1e-9)
        expected = gnorm[layer].clone()
        for lyr, idx in SUPPRESSED:
            if lyr == layer:
                expected[idx] = 0.0
        torch.testing.assert_close(ours["grad_norm"][layer].double(), expected, rtol=1e-4, atol=1e-9)
    assert all(ours["grad_x_act"][layer].abs().sum() > 0 for layer in range(len(gxa)))


def test_lora_a_grad_equals_hand_computed_column_norms(make_session):
    session = make_session()
    randomize_lora_b(session)
    batch = collate(session.task.train, session.pad_id)
    sites = [session.loaded.arch.down_proj_of(layer) for layer in session.loaded.arch.decoder_layers(session.model)]
    seen = {}

    def grab(i):
        def fwd(module, args, out):
            seen[i] = {"a": args[0]}
            out.register_hook(lambda g: seen[i].__setitem__("g_out", g))
        return fwd

    handles = [s.register_forward_hook(grab(i)) for i, s in enumerate(sites)]
    scores = _recorded_step(session, [batch], suppressed=[])
    for h in handles:
        h.remove()
    for i, s in enumerate(sites):
        a = seen[i]["a"].detach().reshape(-1, s.in_features)
        g_out = seen[i]["g_out"].detach().reshape(-1, s.out_features)
        b = s.lora_B["default"].weight.detach()                   # [out, r]
        grad_a = s.scaling["default"] * (g_out @ b).T @ a           # ∂L/∂A = s · (g_out B)ᵀ a : [r, in]
        torch.testing.assert_close(scores["lora_a_grad"][i], grad_a.norm(dim=0), rtol=1e-4, atol=1e-9)


def test_suppressed_unit_is_zero_in_base_and_lora_paths_and_scores_zero(make_session):
    session = make_session()
    randomize_lora_b(session)
    site = session.loaded.arch.down_proj_of(session.loaded.arch.decoder_layers(session.model)[0])
    seen = {}
    h1 = site.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("base", a[0].detach()))
    h2 = site.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.__setitem__("lora", a[0].detach()))
    batch = collate(session.task.train, session.pad_id)

    def inputs(suppressed):
        with torch.no_grad(), session.intervene(session.mask(suppressed)):
            token_losses(session.model, batch, session.device)
        return dict(seen)

    clean, masked = inputs([]), inputs(SUPPRESSED)
    h1.remove()
    h2.remove()
    valid = batch["attention_mask"].bool()
    keep = [j for j in range(clean["base"].shape[-1]) if j not in (3, 17)]
    for path in ("base", "lora"):
        assert torch.all(masked[path][..., [3, 17]] == 0), path
        assert torch.all(clean[path][valid][:, [3, 17]] != 0), path        # they were live before
        # the mask touches exactly the chosen units: every other column equals the unmasked run's
        assert torch.equal(masked[path][..., keep], clean[path][..., keep]), path
    scores = _recorded_step(session, _batches(session))
    for method, per_layer in scores.items():
        for lyr, idx in SUPPRESSED:
            assert per_layer[lyr][idx] == 0.0, method
    ranked = rank(scores["grad_norm"], set(SUPPRESSED))
    assert {(r["unit"]["layer"], r["unit"]["index"]) for r in ranked}.isdisjoint(SUPPRESSED)
    assert len(ranked) == session.basis.n_units - len(SUPPRESSED)


def test_rank_orders_globally_with_stable_ties():
    scores = [torch.tensor([0.5, 2.0, 0.5]), torch.tensor([2.0, 1.0])]
    ranked = rank(scores, exclude={(1, 1)})
    assert [(r["unit"]["layer"], r["unit"]["index"]) for r in ranked] == [(0, 1), (1, 0), (0, 0), (0, 2)]
    assert rank(scores, top=2)[1]["score"] == 2.0
