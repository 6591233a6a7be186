"""Qwen2LanguageModel with TP=2 (two gloo processes), with and without sequence parallel,
against transformers' Qwen2ForCausalLM run in the test process: logits of a dense batch with
given positions, of a packed reset-mode row, and parameter gradients (merged back to HF names).
"""
import torch
import torch.nn.functional as F

from mindspeed_vita.convert.qwen2_weights import native_to_hf_qwen2
from tests.dist_utils import run_distributed
from tests.models.test_language import VOCAB, language_config, tiny_hf_qwen2

SEQ = 10
TOL = 1e-4  # fp32 parity bound (measured ~1e-6)
LENGTHS = (6, 4)  # the packed row: two samples, positions restart


def _tp2_body(rank, world_size, cfg, hf_state, ids, positions, targets):
    from megatron.core.packed_seq_params import PackedSeqParams

    from backends import get_backend
    from mindspeed_vita.convert.qwen2_weights import hf_to_native_qwen2
    from mindspeed_vita.models.language import Qwen2LanguageModel
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(tp=world_size))
    native = hf_to_native_qwen2(hf_state, cfg, rank, world_size)
    cu = torch.tensor([0, LENGTHS[0], sum(LENGTHS)], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(LENGTHS), max_seqlen_kv=max(LENGTHS))
    packed_positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    out = {}
    for sp in (False, True):
        model = Qwen2LanguageModel(cfg, backend, torch.float32,
                                   groups=groups.with_sequence_parallel(sp))
        model.load_state_dict(native, strict=True)
        model.train()
        logits = model.logits(model(model.embed(ids), positions))  # [s, b, V_pad / tp]
        # vocab-parallel cross entropy on this rank's slice (padding columns masked out)
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        start = rank * logits.shape[-1]
        pad = torch.arange(start, start + logits.shape[-1]) >= VOCAB
        loss = vocab_parallel_cross_entropy(logits.masked_fill(pad, float("-inf")),
                                            targets.t().contiguous()).mean()
        loss.backward()
        with torch.no_grad():
            packed_logits = model.logits(model(model.embed(ids[:1]), packed_positions, packed))
        grads = {n: p.grad for n, p in model.named_parameters()}
        seq_parallel_params = sorted(n for n, p in model.named_parameters()
                                     if getattr(p, "sequence_parallel", False))
        out[sp] = (logits.detach(), packed_logits, grads, seq_parallel_params)
    return out


def test_tp2_logits_packed_and_gradients_match_hf():
    cfg = language_config()
    hf = tiny_hf_qwen2(cfg)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    positions = torch.stack([torch.arange(SEQ) * 2, torch.arange(SEQ) + 7])
    ref_logits = hf(input_ids=ids, position_ids=positions).logits
    F.cross_entropy(ref_logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
    with torch.no_grad():
        ref_packed = [hf(input_ids=ids[:1, a:b]).logits[0]
                      for a, b in ((0, LENGTHS[0]), (LENGTHS[0], SEQ))]

    per_rank = run_distributed(_tp2_body, world_size=2,
                               args=(cfg, hf.state_dict(), ids, positions, targets))
    for sp in (False, True):
        logits = torch.cat([r[sp][0] for r in per_rank], dim=-1)[..., :VOCAB].transpose(0, 1)
        assert (logits - ref_logits.detach()).abs().max() <= TOL, f"sequence_parallel={sp}"

        packed = torch.cat([r[sp][1] for r in per_rank], dim=-1)[:, 0, :VOCAB]
        assert (packed[:LENGTHS[0]] - ref_packed[0]).abs().max() <= TOL
        assert (packed[LENGTHS[0]:] - ref_packed[1]).abs().max() <= TOL

        grads = [r[sp][2] for r in per_rank]
        norm_names = per_rank[0][sp][3]
        if sp:
            # each rank saw half the sequence: the norm grads are partial and marked
            # `sequence_parallel` so megatron's finalize_model_grads all-reduces them over tp
            assert norm_names == sorted(n for n in grads[0] if "layernorm" in n)
            for name in norm_names:
                total = grads[0][name] + grads[1][name]
                for g in grads:
                    g[name] = total
        else:
            assert norm_names == []
        as_hf = native_to_hf_qwen2(grads, cfg)
        for name, p in hf.named_parameters():
            assert (as_hf[name] - p.grad).abs().max() <= TOL, (name, sp)
