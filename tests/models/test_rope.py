"""RoPE scaling (linear / dynamic NTK / YaRN) equals transformers' Qwen2 rotary embedding."""
import pytest
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from mindspeed_vita.config.model import LanguageConfig, RopeScalingConfig
from mindspeed_vita.models.rope import rotary_cos_sin

HEAD_DIM, THETA, TRAINED = 64, 1_000_000.0, 4096


def _hf_cos_sin(rope: dict, position_ids: torch.Tensor):
    config = Qwen2Config(hidden_size=HEAD_DIM * 4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TRAINED,
                         rope_parameters={"rope_theta": THETA, **rope})
    emb = Qwen2RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    return emb(x, position_ids)


CASES = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
     "beta_fast": 16.0, "beta_slow": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED,
     "attention_factor": 1.3},
]


@pytest.mark.parametrize("rope", CASES, ids=lambda r: "-".join(f"{v}" for v in r.values()))
@pytest.mark.parametrize("length", [1000, 3 * TRAINED + 17])
def test_scaled_rope_equals_transformers(rope, length):
    positions = torch.arange(length)[None]
    hf_cos, hf_sin = _hf_cos_sin(dict(rope), positions)
    scaling = RopeScalingConfig(**rope)
    cos, sin = rotary_cos_sin(positions, HEAD_DIM, THETA, torch.float32, scaling,
                              max_position_embeddings=TRAINED)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_scaling_changes_angles_beyond_trained_length():
    """Guard against a scaling that is silently ignored: each kind moves cos at long positions."""
    positions = torch.arange(2 * TRAINED)[None]
    plain, _ = rotary_cos_sin(positions, HEAD_DIM, THETA, torch.float32)
    for rope in CASES:
        scaled, _ = rotary_cos_sin(positions, HEAD_DIM, THETA, torch.float32,
                                   RopeScalingConfig(**rope), max_position_embeddings=TRAINED)
        assert not torch.allclose(plain, scaled, atol=1e-3), rope


def test_dynamic_is_plain_within_trained_length():
    positions = torch.arange(TRAINED)[None]
    plain = rotary_cos_sin(positions, HEAD_DIM, THETA, torch.float32)
    dyn = rotary_cos_sin(positions, HEAD_DIM, THETA, torch.float32,
                         RopeScalingConfig(rope_type="dynamic", factor=4.0),
                         max_position_embeddings=TRAINED)
    assert torch.equal(plain[0], dyn[0]) and torch.equal(plain[1], dyn[1])


def test_rope_scaling_config_is_validated():
    with pytest.raises(ValueError, match="rope_type"):
        RopeScalingConfig(rope_type="longrope", factor=2.0)
    with pytest.raises(ValueError, match="factor"):
        RopeScalingConfig(rope_type="yarn", factor=0.5)
    cfg = LanguageConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert cfg.rope_scaling.beta_fast == 32.0


@pytest.mark.parametrize("rope", [CASES[0], CASES[1], CASES[3]], ids=["linear", "dynamic", "yarn"])
def test_decoder_with_scaled_rope_matches_hf_qwen2(rope):
    """The scaling reaches every decoder layer: logits at positions beyond the trained length
    equal transformers' Qwen2 with the same rope settings."""
    from types import SimpleNamespace

    from backends import get_backend
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
    from tests.models.test_language import VOCAB, language_config, native_logits, native_model
    from transformers import Qwen2ForCausalLM

    cfg = language_config(max_position_embeddings=256,
                          rope_scaling={**rope, "original_max_position_embeddings": 256}
                          if rope["rope_type"] == "yarn" else rope)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=256,
        rope_parameters={"rope_theta": cfg.rotary_base,
                         **cfg.rope_scaling.model_dump(exclude_none=True)},
        attn_implementation="eager")).float().eval()
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        model = native_model(cfg, SimpleNamespace(backend=backend, groups=groups), hf)
        ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
        positions = (torch.arange(40) * 25)[None]  # up to ~4x the trained length
        with torch.no_grad():
            ref = hf(input_ids=ids, position_ids=positions).logits
            out = native_logits(model, ids, positions)
    finally:
        destroy_parallel()
    assert (out - ref).abs().max() <= 1e-4
