"""Interventions are values applied in a scope: exact effects, composition, positions, clean exit."""

from __future__ import annotations

import pytest
import torch

from crabsweep import Add, Mask, Scale, Unit
from crabsweep.core.tasks import collate
from crabsweep.loop.train import token_losses

from .conftest import randomize_lora_b


def _site_inputs(session, layer=0):
    """Hooks on the base and LoRA paths of the wrapped down_proj of `layer`: what each path receives."""
    site = session.loaded.arch.down_proj_of(session.loaded.arch.decoder_layers(session.model)[layer])
    seen = {}
    hooks = [site.base_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("base", a[0].detach())),
             site.lora_A["default"].register_forward_pre_hook(lambda m, a: seen.__setitem__("lora", a[0].detach()))]
    return site, seen, hooks


def _forward(session, batch, *interventions):
    with torch.no_grad(), session.intervene(*interventions):
        return session.model(input_ids=batch["input_ids"]).logits


def test_suppress_and_steer_together_touch_exactly_the_two_sets(make_session):
    session = make_session()
    randomize_lora_b(session)
    site, seen, hooks = _site_inputs(session)
    batch = collate(session.task.train[:1], session.pad_id)
    _forward(session, batch)
    clean = dict(seen)
    S, T = [(0, 3), (0, 17)], [(0, 5), (1, 9)]
    _forward(session, batch, session.mask(S), Scale(tuple(T), 4.0))
    for h in hooks:
        h.remove()
    others = [j for j in range(clean["base"].shape[-1]) if j not in (3, 17, 5)]
    for path in ("base", "lora"):
        x, c = seen[path], clean[path]
        assert torch.all(x[..., [3, 17]] == 0) and torch.all(c[..., [3, 17]] != 0)
        torch.testing.assert_close(x[..., 5], 4.0 * c[..., 5], rtol=0, atol=0)
        assert torch.equal(x[..., others], c[..., others])
    assert len(site._forward_pre_hooks) == 0                      # the scope left nothing behind


def test_scope_is_restored_on_exit_even_on_error(make_session):
    session = make_session()
    batch = collate(session.task.train[:1], session.pad_id)
    clean = _forward(session, batch)
    sites = session.basis.sites(session.model)
    before = [len(s._forward_pre_hooks) for s in sites]
    with pytest.raises(RuntimeError, match="boom"):
        with session.intervene(session.mask([(0, 1), (1, 2)]), Scale((Unit(0, 4),), 0.0)):
            assert [len(s._forward_pre_hooks) for s in sites] != before
            raise RuntimeError("boom")
    assert [len(s._forward_pre_hooks) for s in sites] == before
    assert torch.equal(_forward(session, batch), clean)


def test_order_of_composition_and_identities(make_session):
    session = make_session()
    batch = collate(session.task.train[:1], session.pad_id)
    clean = _forward(session, batch)
    assert torch.equal(_forward(session, batch, Scale(((0, 3),), 1.0)), clean)          # multiplier 1 is a no-op
    assert torch.equal(_forward(session, batch, Mask(())), clean)                         # an empty mask too
    # scaling after zeroing is still zero; zeroing after scaling too: both equal the plain mask
    masked = _forward(session, batch, session.mask([(0, 3)]))
    assert torch.equal(_forward(session, batch, session.mask([(0, 3)]), Scale(((0, 3),), 7.0)), masked)
    assert torch.equal(_forward(session, batch, Scale(((0, 3),), 7.0), session.mask([(0, 3)])), masked)
    assert not torch.equal(masked, clean)


def test_positions_restrict_an_intervention_to_those_tokens(make_session):
    session = make_session()
    site, seen, hooks = _site_inputs(session)
    batch = collate(session.task.train[:1], session.pad_id)
    _forward(session, batch)
    clean = seen["base"]
    _forward(session, batch, Scale(((0, 5),), 3.0, positions=(2, -1)))
    for h in hooks:
        h.remove()
    x = seen["base"][0]
    t = x.shape[0]
    changed = [p for p in range(t) if not torch.equal(x[p], clean[0][p])]
    assert changed == [2, t - 1]
    torch.testing.assert_close(x[2, 5], 3.0 * clean[0][2, 5])


def test_positions_follow_the_kv_cache_during_generation(make_session):
    """In generation each step sees one new token; its absolute position must still be known."""
    session = make_session()
    ex = session.task.heldout[0]
    ids = ex.prompt_ids[None]
    seen = []
    site = session.basis.sites(session.model)[0]
    h = site.base_layer.register_forward_pre_hook(lambda m, a: seen.append(a[0][0, :, 5].detach().clone()))
    p = len(ex.prompt_ids) + 1            # the second generated token's position
    with torch.no_grad(), session.intervene(Scale(((0, 5),), 0.0, positions=(p,))):
        session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                               pad_token_id=session.pad_id)
    h.remove()
    assert len(seen) == 3 and seen[0].shape[0] == len(ex.prompt_ids)
    assert torch.all(seen[0] != 0) and torch.all(seen[1] != 0) and torch.all(seen[2] == 0)


def test_add_vector_adds_to_one_group(make_session):
    session = make_session("suppression=residual_dim", "suppression.layers=[0]", "attribution=grad_norm")
    layer0 = session.loaded.arch.decoder_layers(session.model)[1]
    seen = []
    h = layer0.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()),
                                         with_kwargs=True)
    batch = collate(session.task.train[:1], session.pad_id)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    _forward(session, batch)
    _forward(session, batch, Add(group=0, vector=v, alpha=0.5))
    h.remove()
    torch.testing.assert_close(seen[1], seen[0] + 0.5 * v, rtol=1e-6, atol=1e-6)


def test_unit_is_a_typed_value_that_writes_todays_json(make_session):
    session = make_session()
    u = Unit(1, 7)
    assert u == (1, 7) and hash(u) == hash((1, 7)) and u.group == 1 and u.index == 7
    assert session.basis.unit_json(u) == {"layer": 1, "index": 7}
    assert session.basis.unit_from_json({"layer": 1, "index": 7}) == u
    with pytest.raises(Exception, match="must be integers"):
        session.basis.unit_from_json({"layer": 0.7, "index": 1})
    assert session.basis.layers_of(u) == (1,)


def test_masking_does_not_change_unmasked_loss_bitwise(make_session):
    session = make_session()
    batch = collate(session.task.train, session.pad_id)
    with torch.no_grad():
        a = token_losses(session.model, batch, "cpu")[0]
        with session.intervene(session.mask([])):
            b = token_losses(session.model, batch, "cpu")[0]
    assert torch.equal(a, b)
