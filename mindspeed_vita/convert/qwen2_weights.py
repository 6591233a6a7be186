"""Qwen2 weights: transformers (HF) state dict <-> native per-tp-rank shards of Qwen2LanguageModel.

Native layout (megatron's, see `models.language`):

* qkv is one `linear_qkv` whose output rows are grouped per key/value head g:
  `[q heads of group g (n_q / n_kv of them), k_g, v_g]` for g = 0..n_kv-1, each head `d` rows;
  the bias follows the same order. tp rank r holds the r-th of tp equal row slices.
* `linear_fc1` on rank r is `[gate_r; up_r]`, the r-th slices of gate_proj and up_proj.
* `linear_proj` (o_proj) and `linear_fc2` (down_proj) are row parallel: split along inputs.
* Embedding / output layer rows are padded with zeros to `padded_vocab_size` and split in tp
  equal slices. `native_to_hf_qwen2` drops the padding again, so hf -> native -> hf is exact.
"""
from __future__ import annotations

from typing import Dict, List, Mapping

import torch

from mindspeed_vita.config.model import LanguageConfig
from mindspeed_vita.models.language import padded_vocab_size

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."


#: the LanguageConfig fields that set the shape of each HF Qwen2 tensor (by name suffix)
_SHAPE_FIELDS = (
    (("embed_tokens.weight", "lm_head.weight"), ("vocab_size", "hidden_size")),
    (("q_proj.weight", "q_proj.bias", "o_proj.weight"), ("num_attention_heads", "hidden_size")),
    (("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"),
     ("num_query_groups", "num_attention_heads", "hidden_size")),
    (("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
     ("ffn_hidden_size", "hidden_size")),
    (("norm.weight",), ("hidden_size",)),
)


def shape_fields(key: str) -> tuple:
    """The LanguageConfig fields the shape of the HF Qwen2 tensor `key` follows."""
    for suffixes, fields in _SHAPE_FIELDS:
        if key.endswith(suffixes):
            return fields
    return ("hidden_size",)


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple,
          cfg: LanguageConfig) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"HF Qwen2 state dict has no {key!r}")
    t = sd[key]
    if tuple(t.shape) != tuple(shape):
        fields = ", ".join(f"language.{name}={getattr(cfg, name)!r}"
                           for name in shape_fields(key))
        raise ValueError(f"HF Qwen2 state dict: {key!r} has shape {tuple(t.shape)}, "
                         f"expected {tuple(shape)} from {fields}")
    return t


def _split(t: torch.Tensor, tp_size: int, dim: int, key: str) -> List[torch.Tensor]:
    if t.shape[dim] % tp_size:
        raise ValueError(f"{key!r}: dim {dim} of size {t.shape[dim]} is not divisible by "
                         f"tp_size={tp_size}")
    return list(torch.chunk(t, tp_size, dim=dim))


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LanguageConfig):
    """HF q/k/v (rows = heads * d) -> megatron's per-group [q..., k, v] row order."""
    d, g = cfg.head_dim, cfg.num_query_groups
    rep = cfg.num_attention_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, rep * d, *tail)
    k = k.reshape(g, d, *tail)
    v = v.reshape(g, d, *tail)
    return torch.cat((q, k, v), dim=1).reshape(-1, *tail)


def _deinterleave_qkv(qkv: torch.Tensor, cfg: LanguageConfig):
    """Inverse of `_interleave_qkv`."""
    d, g = cfg.head_dim, cfg.num_query_groups
    rep = cfg.num_attention_heads // g
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (rep + 2) * d, *tail)
    q, k, v = torch.split(grouped, [rep * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _expected_keys(cfg: LanguageConfig) -> List[str]:
    keys = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        keys.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = _HF_LAYER.format(i=i)
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight",
                 p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
        for proj in ("q_proj", "k_proj", "v_proj"):
            keys.append(p + f"self_attn.{proj}.weight")
            if cfg.qkv_bias:
                keys.append(p + f"self_attn.{proj}.bias")
    return keys


def native_language_shapes(cfg: LanguageConfig) -> Dict[str, tuple]:
    """Shape of every native language tensor of the full (tp=1) state (`Qwen2LanguageModel`
    names, no `language.` prefix): what the model builds, checkable without building it (a
    test compares it with the model built on the meta device)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * d
    v_pad = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, 1)
    shapes: Dict[str, tuple] = {"embedding.word_embeddings.weight": (v_pad, h),
                                "decoder.final_layernorm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (v_pad, h)
    for i in range(cfg.num_layers):
        p = _LAYER.format(i=i)
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": (qkv_rows, h),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * f, h),
            p + "mlp.linear_fc2.weight": (h, f),
        })
        if cfg.qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
    return shapes


def _check_no_unknown_keys(hf: Mapping[str, torch.Tensor], cfg: LanguageConfig) -> None:
    known = set(_expected_keys(cfg))
    # rotary inverse frequencies are recomputed from the config; older checkpoints store them
    unknown = sorted(k for k in hf if k not in known and not k.endswith("rotary_emb.inv_freq")
                     and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if unknown:
        raise KeyError(f"HF Qwen2 state dict has keys this LanguageConfig does not describe "
                       f"(num_layers={cfg.num_layers}, qkv_bias={cfg.qkv_bias}): {unknown[:8]}")


def hf_to_native_qwen2(hf_state_dict: Mapping[str, torch.Tensor], cfg: LanguageConfig,
                       tp_rank: int, tp_size: int) -> Dict[str, torch.Tensor]:
    """The native state dict of tp rank `tp_rank` (of `tp_size`) for Qwen2LanguageModel."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    hf = hf_state_dict
    _check_no_unknown_keys(hf, cfg)
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    v_pad = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)

    def vocab_shard(key: str) -> torch.Tensor:
        w = _take(hf, key, (cfg.vocab_size, h), cfg)
        padded = torch.cat((w, w.new_zeros(v_pad - cfg.vocab_size, h)))
        return _split(padded, tp_size, 0, key)[tp_rank].clone()

    out: Dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": vocab_shard("model.embed_tokens.weight"),
        "decoder.final_layernorm.weight": _take(hf, "model.norm.weight", (h,), cfg).clone(),
    }
    if cfg.tie_word_embeddings:
        if "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"],
                                                       hf["model.embed_tokens.weight"]):
            raise ValueError("tie_word_embeddings=True but 'lm_head.weight' differs from "
                             "'model.embed_tokens.weight'")
    else:
        out["output_layer.weight"] = vocab_shard("lm_head.weight")

    for i in range(cfg.num_layers):
        src, dst = _HF_LAYER.format(i=i), _LAYER.format(i=i)
        q = _take(hf, src + "self_attn.q_proj.weight", (nq * d, h), cfg)
        k = _take(hf, src + "self_attn.k_proj.weight", (nkv * d, h), cfg)
        v = _take(hf, src + "self_attn.v_proj.weight", (nkv * d, h), cfg)
        qkv_key = dst + "self_attention.linear_qkv.weight"
        out[qkv_key] = _split(_interleave_qkv(q, k, v, cfg), tp_size, 0, qkv_key)[tp_rank].clone()
        if cfg.qkv_bias:
            qb = _take(hf, src + "self_attn.q_proj.bias", (nq * d,), cfg)
            kb = _take(hf, src + "self_attn.k_proj.bias", (nkv * d,), cfg)
            vb = _take(hf, src + "self_attn.v_proj.bias", (nkv * d,), cfg)
            bias_key = dst + "self_attention.linear_qkv.bias"
            out[bias_key] = _split(_interleave_qkv(qb, kb, vb, cfg), tp_size, 0,
                                   bias_key)[tp_rank].clone()
        o_key = dst + "self_attention.linear_proj.weight"
        o_proj = _take(hf, src + "self_attn.o_proj.weight", (h, nq * d), cfg)
        out[o_key] = _split(o_proj, tp_size, 1, o_key)[tp_rank].clone()
        gate = _split(_take(hf, src + "mlp.gate_proj.weight", (f, h), cfg), tp_size, 0,
                      src + "mlp.gate_proj.weight")[tp_rank]
        up = _split(_take(hf, src + "mlp.up_proj.weight", (f, h), cfg), tp_size, 0,
                    src + "mlp.up_proj.weight")[tp_rank]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat((gate, up))
        fc2_key = dst + "mlp.linear_fc2.weight"
        down = _take(hf, src + "mlp.down_proj.weight", (h, f), cfg)
        out[fc2_key] = _split(down, tp_size, 1, fc2_key)[tp_rank].clone()
        out[dst + "input_layernorm.weight"] = _take(
            hf, src + "input_layernorm.weight", (h,), cfg).clone()
        out[dst + "pre_mlp_layernorm.weight"] = _take(
            hf, src + "post_attention_layernorm.weight", (h,), cfg).clone()
    return out


def _require(shards: List[Mapping[str, torch.Tensor]], key: str) -> None:
    for rank, shard in enumerate(shards):
        if key not in shard:
            raise KeyError(f"native shard of tp rank {rank} has no {key!r}")


def _gather(shards: List[Mapping[str, torch.Tensor]], key: str, dim: int) -> torch.Tensor:
    _require(shards, key)
    return torch.cat([shard[key] for shard in shards], dim=dim)


def _replicated(shards: List[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    _require(shards, key)
    return shards[0][key].clone()


def native_to_hf_qwen2(shards: List[Mapping[str, torch.Tensor]],
                       cfg: LanguageConfig) -> Dict[str, torch.Tensor]:
    """Merge the native state dicts of all tp ranks (in rank order) into an HF Qwen2 state dict
    (vocabulary padding removed). Exact inverse of `hf_to_native_qwen2`."""
    if not shards:
        raise ValueError("native_to_hf_qwen2 needs the shards of every tp rank, got none")
    tp = len(shards)
    v_pad = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)

    def vocab(key: str) -> torch.Tensor:
        w = _gather(shards, key, 0)
        if w.shape[0] != v_pad:
            raise ValueError(f"{key!r}: gathered {w.shape[0]} vocabulary rows over {tp} tp ranks, "
                             f"expected padded size {v_pad}")
        return w[: cfg.vocab_size].clone()

    hf: Dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": vocab("embedding.word_embeddings.weight"),
        "model.norm.weight": _replicated(shards, "decoder.final_layernorm.weight"),
    }
    if not cfg.tie_word_embeddings:
        hf["lm_head.weight"] = vocab("output_layer.weight")
    for i in range(cfg.num_layers):
        src, dst = _LAYER.format(i=i), _HF_LAYER.format(i=i)
        qkv = _gather(shards, src + "self_attention.linear_qkv.weight", 0)
        q, k, v = _deinterleave_qkv(qkv, cfg)
        hf[dst + "self_attn.q_proj.weight"] = q.clone()
        hf[dst + "self_attn.k_proj.weight"] = k.clone()
        hf[dst + "self_attn.v_proj.weight"] = v.clone()
        if cfg.qkv_bias:
            qkv_bias = _gather(shards, src + "self_attention.linear_qkv.bias", 0)
            qb, kb, vb = _deinterleave_qkv(qkv_bias, cfg)
            hf[dst + "self_attn.q_proj.bias"] = qb.clone()
            hf[dst + "self_attn.k_proj.bias"] = kb.clone()
            hf[dst + "self_attn.v_proj.bias"] = vb.clone()
        hf[dst + "self_attn.o_proj.weight"] = _gather(
            shards, src + "self_attention.linear_proj.weight", 1)
        _require(shards, src + "mlp.linear_fc1.weight")
        gate_up = [torch.chunk(s[src + "mlp.linear_fc1.weight"], 2, dim=0) for s in shards]
        hf[dst + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in gate_up])
        hf[dst + "mlp.up_proj.weight"] = torch.cat([u for _, u in gate_up])
        hf[dst + "mlp.down_proj.weight"] = _gather(shards, src + "mlp.linear_fc2.weight", 1)
        hf[dst + "input_layernorm.weight"] = _replicated(shards, src + "input_layernorm.weight")
        hf[dst + "post_attention_layernorm.weight"] = _replicated(
            shards, src + "pre_mlp_layernorm.weight")
    return hf
