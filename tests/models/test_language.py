"""Qwen2LanguageModel (TP=1, one process) against transformers' Qwen2ForCausalLM, and the
HF <-> native weight conversion.

The oracle is a tiny random Qwen2 in fp32 with eager attention (hidden 64, 2 layers, 4 query /
2 kv heads, vocab 1000, rope_theta 1e6) whose qkv biases and norm weights are random too, so a
wrong bias layout or a norm that ignores its weight shows up.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends import get_backend
from mindspeed_vita.config.model import LanguageConfig
from mindspeed_vita.convert.qwen2_weights import hf_to_native_qwen2, native_to_hf_qwen2
from mindspeed_vita.models.language import Qwen2LanguageModel, padded_vocab_size
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

VOCAB = 1000
TOL = 1e-4  # fp32 parity bound (measured ~1e-6)


def language_config(**overrides) -> LanguageConfig:
    fields = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=128, vocab_size=VOCAB, rms_norm_eps=1e-6, rotary_base=1e6,
                  max_position_embeddings=4096, make_vocab_size_divisible_by=128)
    fields.update(overrides)
    return LanguageConfig(**fields)


def tiny_hf_qwen2(cfg: LanguageConfig, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, vocab_size=cfg.vocab_size,
        rope_theta=cfg.rotary_base, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="eager")
    model = Qwen2ForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
    return model


@pytest.fixture(scope="module")
def parallel():
    """The CPU backend and the one-process groups."""
    backend = get_backend("cpu")
    yield SimpleNamespace(backend=backend, groups=initialize_parallel(backend, ParallelLayout()))
    destroy_parallel()


def native_model(cfg, parallel, hf, **kwargs) -> Qwen2LanguageModel:
    model = Qwen2LanguageModel(cfg, parallel.backend, torch.float32, groups=parallel.groups,
                               **kwargs)
    model.load_state_dict(hf_to_native_qwen2(hf.state_dict(), cfg, 0, 1), strict=True)
    return model


def native_logits(model, ids, positions, packed_seq_params=None):
    hidden = model(model.embed(ids), positions, packed_seq_params)
    return model.logits(hidden)[..., :VOCAB].transpose(0, 1)  # [b, s, V]


def test_logits_match_hf(parallel):
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    model = native_model(cfg, parallel, hf)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    # positions with gaps and a row that does not start at 0: RoPE must follow them, not arange
    positions = torch.stack([torch.arange(12) * 3, torch.arange(12) + 100])
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions).logits
        out = native_logits(model, ids, positions)
        arange_out = native_logits(model, ids, torch.arange(12).repeat(2, 1))
    assert (out - ref).abs().max() <= TOL
    assert (arange_out - ref).abs().max() > 1e-3  # the positions given do matter


def test_tied_embeddings_match_hf(parallel):
    cfg = language_config(tie_word_embeddings=True)
    hf = tiny_hf_qwen2(cfg)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    model = native_model(cfg, parallel, hf)
    assert "output_layer.weight" not in model.state_dict()
    assert model.output_weight is model.embedding.word_embeddings.weight
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(6))
    positions = torch.arange(8)[None]
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions).logits
        assert (native_logits(model, ids, positions) - ref).abs().max() <= TOL
    round_trip = native_to_hf_qwen2([hf_to_native_qwen2(hf.state_dict(), cfg, 0, 1)], cfg)
    assert "lm_head.weight" not in round_trip  # tied: HF re-ties it on load


def test_bfloat16_model_tracks_bfloat16_hf(parallel):
    """bf16 end to end (params, rotary cos/sin, norms): close to HF run in bf16."""
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    model = Qwen2LanguageModel(cfg, parallel.backend, torch.bfloat16, groups=parallel.groups)
    native = hf_to_native_qwen2(hf.state_dict(), cfg, 0, 1)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in native.items()}, strict=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))
    positions = torch.arange(12).repeat(2, 1)
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=positions).logits.float()
        out = native_logits(model, ids, positions)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def _packed(lengths_per_row, seq):
    """cu_seqlens over the row-major flattened tokens and positions restarting per sample."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, positions = [0], []
    for lengths in lengths_per_row:
        assert sum(lengths) == seq
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
        for n in lengths:
            cu.append(cu[-1] + n)
    cu = torch.tensor(cu, dtype=torch.int32)
    longest = max(max(lengths) for lengths in lengths_per_row)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    return torch.stack(positions), params


@pytest.mark.parametrize("lengths_per_row", [[(6, 4)], [(6, 4), (3, 7)]])
def test_packed_reset_batch_equals_separate_samples(parallel, lengths_per_row):
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    model = native_model(cfg, parallel, hf)
    seq = sum(lengths_per_row[0])
    ids = torch.randint(0, VOCAB, (len(lengths_per_row), seq),
                        generator=torch.Generator().manual_seed(2))
    positions, params = _packed(lengths_per_row, seq)
    with torch.no_grad():
        out = native_logits(model, ids, positions, params)
        for row, lengths in enumerate(lengths_per_row):
            start = 0
            for n in lengths:
                ref = hf(input_ids=ids[row:row + 1, start:start + n]).logits[0]
                assert (out[row, start:start + n] - ref).abs().max() <= TOL
                start += n
        unpacked = native_logits(model, ids, positions)  # same positions, no boundaries
    assert (unpacked - out).abs().max() > 1e-3  # the boundaries do matter


def _loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_match_hf(parallel, recompute):
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    model = native_model(cfg, parallel, hf, recompute=recompute)
    model.train()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 10), generator=gen)
    targets = torch.randint(0, VOCAB, (2, 10), generator=gen)
    positions = torch.arange(10).repeat(2, 1)
    _loss(hf(input_ids=ids, position_ids=positions).logits, targets).backward()
    _loss(native_logits(model, ids, positions), targets).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), "every parameter gets a gradient"
    as_hf = native_to_hf_qwen2([grads], cfg)
    for name, p in hf.named_parameters():
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        assert (as_hf[name] - p.grad).abs().max() <= TOL * max(1.0, scale), name


def test_recompute_is_bit_identical(parallel):
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(9)[None]
    results = []
    for recompute in (False, True):
        model = native_model(cfg, parallel, hf, recompute=recompute)
        model.train()
        logits = native_logits(model, ids, positions)
        logits.square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.equal(plain, recomputed)
    for name, g in plain_grads.items():
        assert torch.equal(g, recomputed_grads[name]), name


def test_sharded_state_dict_covers_every_parameter(parallel):
    """megatron distributed checkpointing sees every parameter (all modules are MegatronModules)."""
    cfg = language_config(num_layers=1)
    model = Qwen2LanguageModel(cfg, parallel.backend, torch.float32, groups=parallel.groups)
    sharded = model.sharded_state_dict()
    assert {name for name, _ in model.named_parameters()} <= set(sharded)


def test_model_rejects_bad_shapes(parallel):
    cfg = language_config(num_layers=1)
    model = Qwen2LanguageModel(cfg, parallel.backend, torch.float32, groups=parallel.groups)
    with pytest.raises(ValueError, match=r"input_ids must be \[b, s\]"):
        model.embed(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decoder_input must be \[s, b, 64\]"):
        model(torch.zeros(4, 1, 32), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position_ids must be \[b=1, s\]"):
        model(torch.zeros(4, 1, 64), torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ conversion
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_weight_round_trip_is_exact(tp_size):
    """hf -> native shards -> hf is bit-exact; tp=4 > 2 kv heads splits inside a qkv group."""
    cfg = language_config()
    hf_sd = tiny_hf_qwen2(cfg).state_dict()
    shards = [hf_to_native_qwen2(hf_sd, cfg, r, tp_size) for r in range(tp_size)]
    v_pad = padded_vocab_size(VOCAB, 128, tp_size)
    assert shards[0]["embedding.word_embeddings.weight"].shape == (v_pad // tp_size, 64)
    assert shards[0]["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 128 // tp_size, 64)
    back = native_to_hf_qwen2(shards, cfg)
    assert back.keys() == hf_sd.keys()
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key
    again = [hf_to_native_qwen2(back, cfg, r, tp_size) for r in range(tp_size)]
    for shard, shard_again in zip(shards, again):
        assert all(torch.equal(shard[k], shard_again[k]) for k in shard)


def test_qkv_layout_is_grouped_per_kv_head():
    """Rows of linear_qkv: [q0 q1 k0 v0 | q2 q3 k1 v1] (heads of 16 rows), megatron's GQA order."""
    cfg = language_config(num_layers=1)
    hf_sd = tiny_hf_qwen2(cfg).state_dict()
    qkv = hf_to_native_qwen2(hf_sd, cfg, 0, 1)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q = hf_sd["model.layers.0.self_attn.q_proj.weight"]
    k = hf_sd["model.layers.0.self_attn.k_proj.weight"]
    v = hf_sd["model.layers.0.self_attn.v_proj.weight"]
    d = 16
    expected = torch.cat([q[0:2 * d], k[0:d], v[0:d], q[2 * d:4 * d], k[d:2 * d], v[d:2 * d]])
    assert torch.equal(qkv, expected)


def test_conversion_errors_name_the_key():
    cfg = language_config(num_layers=1)
    hf_sd = dict(tiny_hf_qwen2(cfg).state_dict())
    missing = {k: v for k, v in hf_sd.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj.weight"):
        hf_to_native_qwen2(missing, cfg, 0, 1)
    wrong = dict(hf_sd, **{"model.norm.weight": torch.ones(63)})
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(63,\)"):
        hf_to_native_qwen2(wrong, cfg, 0, 1)
    extra = dict(hf_sd, **{"model.layers.1.input_layernorm.weight": torch.ones(64)})
    with pytest.raises(KeyError, match="model.layers.1.input_layernorm.weight"):
        hf_to_native_qwen2(extra, cfg, 0, 1)
    shards = [hf_to_native_qwen2(hf_sd, cfg, r, 2) for r in range(2)]
    del shards[1]["decoder.layers.0.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match="tp rank 1 .*linear_fc2"):
        native_to_hf_qwen2(shards, cfg)
