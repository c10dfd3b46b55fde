"""Dictionary folders written by independent writers (SAELens' documented schema, sparsify's layout, the
README's crosscoder format) load into crabsweep and encode/decode exactly as the formats specify."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from crabsweep.dictionary.formats import load_dictionary
from crabsweep.dictionary.sites import Site, parse_site
from crabsweep.errors import UserError

D, F = 16, 64


# -- an independent SAELens writer (SAELens 6.x schema: cfg.json with a metadata sub-dict; pre-6 flat) ------
def _weights(seed: int, d: int = D, f: int = F) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(f, d, generator=g)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
    return {"W_enc": w_dec.T.clone() + 0.01 * torch.randn(d, f, generator=g), "b_enc": 0.1 * torch.randn(f, generator=g),
            "W_dec": w_dec, "b_dec": 0.1 * torch.randn(d, generator=g)}


def write_saelens(path, architecture, tensors, *, hook_name="blocks.1.hook_resid_post", k=None,
                  apply_b_dec_to_input=True, dtype="float32", legacy=False, extra_cfg=None):
    path.mkdir(parents=True)
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    save_file({n: t.to(tdt).contiguous() for n, t in tensors.items()}, str(path / "sae_weights.safetensors"))
    d_in, d_sae = tensors["W_enc"].shape
    if legacy:
        cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
               "model_name": "tiny", "hook_name": hook_name, "hook_layer": 1, "hook_head_index": None,
               "activation_fn_str": "topk" if k else "relu", "activation_fn_kwargs": {"k": k} if k else {},
               "apply_b_dec_to_input": apply_b_dec_to_input, "finetuning_scaling_factor": False,
               "sae_lens_training_version": None, "prepend_bos": True, "dataset_path": "x", "context_size": 128,
               "normalize_activations": "none", "neuronpedia_id": None, "model_from_pretrained_kwargs": {},
               "seqpos_slice": [None]}
    else:
        cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": apply_b_dec_to_input,
               "normalize_activations": "none", "reshape_activations": "none", "architecture": architecture,
               "metadata": {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0", "model_name": "tiny",
                            "hook_name": hook_name, "hook_head_index": None, "model_class_name": "HookedTransformer",
                            "model_from_pretrained_kwargs": {}, "context_size": 128, "prepend_bos": True,
                            "dataset_path": "x", "seqpos_slice": [None], "exclude_special_tokens": False,
                            "neuronpedia_id": None}}
        if architecture == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    cfg.update(extra_cfg or {})
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return path


def ref_encode(arch, t, x, k=None, apply_b_dec=True, rescale=False):
    pre = (x - t["b_dec"] * float(apply_b_dec)) @ t["W_enc"] + t["b_enc"]
    if arch == "standard":
        return pre.relu()
    if arch == "jumprelu":
        return pre.relu() * (pre > t["threshold"])
    norms = t["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    vals, idx = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    return f / norms if rescale else f


def ref_decode(t, f):
    return f @ t["W_dec"] + t["b_dec"]


def _x(n=40, d=D, seed=9):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _check(dic, t, arch, k=None, apply_b_dec=True, rescale=False, atol=1e-5):
    x = _x()
    f = ref_encode(arch, t, x, k, apply_b_dec, rescale)
    got = dic.encode(x[:, None])
    torch.testing.assert_close(got, f, atol=atol, rtol=1e-5)
    torch.testing.assert_close(dic.decode(f)[:, 0], ref_decode(t, f), atol=atol, rtol=1e-5)
    assert (f > 0).any() and (f == 0).any()


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_folders_load_and_match_the_spec(tmp_path, arch, legacy):
    t = _weights(1)
    if arch == "jumprelu":
        t["threshold"] = torch.rand(F, generator=torch.Generator().manual_seed(3)) * 0.3
    k = 8 if arch == "topk" else None
    folder = write_saelens(tmp_path / arch, arch, t, k=k, legacy=legacy)
    dic = load_dictionary(folder)
    assert dic.sites == (Site(1, "resid_post"),) and dic.n_features == F and dic.d == D and dic.name == arch
    assert dic.activation == {"standard": "relu"}.get(arch, arch) and dic.k == k
    _check(dic, t, arch, k)


def test_saelens_variants_dtype_no_bias_input_rescale_and_scaling_factor(tmp_path):
    t = _weights(2)
    bf = load_dictionary(write_saelens(tmp_path / "bf16", "standard", t, dtype="bfloat16"))
    rounded = {n: v.to(torch.bfloat16).float() for n, v in t.items()}
    _check(bf, rounded, "standard")
    nob = load_dictionary(write_saelens(tmp_path / "nob", "standard", t, apply_b_dec_to_input=False,
                                        hook_name="blocks.0.hook_mlp_out"))
    assert nob.sites == (Site(0, "mlp_out"),)
    _check(nob, t, "standard", apply_b_dec=False)
    t_rs = {**t, "W_dec": t["W_dec"] * torch.linspace(0.5, 2.0, F)[:, None]}        # rows not unit norm
    rs = load_dictionary(write_saelens(tmp_path / "rs", "topk", t_rs, k=8, extra_cfg={"rescale_acts_by_decoder_norm": True}))
    _check(rs, t_rs, "topk", k=8, rescale=True)
    # pre-6 fine-tuning scaling factor: decode (f·s) @ W_dec
    s = torch.linspace(0.5, 1.5, F)
    folder = write_saelens(tmp_path / "sf", "standard", {**t, "scaling_factor": s}, legacy=True,
                           extra_cfg={"finetuning_scaling_factor": True})
    sf = load_dictionary(folder)
    f = ref_encode("standard", t, _x())
    torch.testing.assert_close(sf.decode(f)[:, 0], (f * s) @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=1e-5)


def test_sparsify_folder(tmp_path):
    t = _weights(4)
    folder = tmp_path / "layers.1"
    folder.mkdir()
    save_file({"encoder.weight": t["W_enc"].T.contiguous(), "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 4, "normalize_decoder": True,
                                                 "num_latents": F, "k": 8, "multi_topk": False, "skip_connection": False,
                                                 "transcode": False, "d_in": D}))
    dic = load_dictionary(folder)
    assert dic.sites == (Site(1, "resid_post"),)
    x = _x()
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]                     # sparsify: relu, then top-k
    vals, idx = pre.relu().topk(8, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, idx, vals)
    torch.testing.assert_close(dic.encode(x[:, None]), f, atol=1e-5, rtol=1e-5)


def test_crosscoder_folder_as_the_readme_documents(tmp_path):
    L, g = 3, torch.Generator().manual_seed(5)
    t = {"W_enc": torch.randn(L, D, F, generator=g) * 0.3, "b_enc": torch.randn(F, generator=g) * 0.1,
         "W_dec": torch.randn(F, L, D, generator=g) * 0.3, "b_dec": torch.randn(L, D, generator=g) * 0.1}
    folder = tmp_path / "cc"
    folder.mkdir()
    save_file(t, str(folder / "sae_weights.safetensors"))
    hooks = ["blocks.0.hook_resid_post", "model.layers.1", "blocks.2.hook_resid_pre"]
    (folder / "cfg.json").write_text(json.dumps({"architecture": "crosscoder", "d_in": D, "d_sae": F, "n_layers": L,
                                                 "hook_names": hooks, "activation": "topk", "k": 6,
                                                 "apply_b_dec_to_input": True, "dtype": "float32", "metadata": {}}))
    dic = load_dictionary(folder)
    assert dic.sites == (Site(0), Site(1), Site(2, "resid_pre")) and dic.layers == (0, 1, 2)
    x = torch.randn(7, L, D, generator=g)
    pre = sum((x[:, i] - t["b_dec"][i]) @ t["W_enc"][i] for i in range(L)) + t["b_enc"]
    vals, idx = pre.topk(6, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    torch.testing.assert_close(dic.encode(x), f, atol=1e-5, rtol=1e-5)
    recon = torch.stack([f @ t["W_dec"][:, i] + t["b_dec"][i] for i in range(L)], dim=1)
    torch.testing.assert_close(dic.decode(f), recon, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, site", [("blocks.3.hook_resid_post", Site(3)), ("model.layers.7", Site(7)),
                                        ("layers.2", Site(2)), ("layers.2.mlp", Site(2, "mlp_out")),
                                        ("model.layers.4.self_attn", Site(4, "attn_out")),
                                        ("blocks.0.hook_resid_pre", Site(0, "resid_pre")),
                                        ("model.language_model.layers.5", Site(5))])
def test_hook_names(name, site):
    assert parse_site(name) == site


def test_refusals_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dictionary(tmp_path / "nope")
    t = _weights(6)
    gated = write_saelens(tmp_path / "gated", "gated", t)
    with pytest.raises(UserError, match="architecture 'gated' is not supported"):
        load_dictionary(gated)
    extra = write_saelens(tmp_path / "extra", "standard", {**t, "W_skip": torch.zeros(D, D)})
    with pytest.raises(UserError, match="unexpected \\['W_skip'\\]"):
        load_dictionary(extra)
    hook = write_saelens(tmp_path / "hook", "standard", t, hook_name="blocks.1.attn.hook_z")
    with pytest.raises(UserError, match="not one crabsweep can place"):
        load_dictionary(hook)
    bad = write_saelens(tmp_path / "bad", "standard", {**t, "b_dec": torch.zeros(D + 1)})
    with pytest.raises(UserError, match="b_dec has shape"):
        load_dictionary(bad)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        load_dictionary(tmp_path / "broken")
    parent = tmp_path / "release"
    write_saelens(parent / "layer_1", "standard", t)
    with pytest.raises(UserError, match="pass one of them"):
        load_dictionary(parent)
