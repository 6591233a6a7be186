"""The CPU fake of torch_npu against independent oracles and the worked examples of
docs/npu-op-contract.md.

Oracles: torch's own CPU flash attention (`aten._scaled_dot_product_flash_attention_for_cpu` and
its backward) for plain causal / full attention, and fp64 autograd over an explicitly masked
softmax for every other kept region (bands, sparse modes, varlen).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from backends.fakes import FakeTorchNPU, compressed_causal_mask
from backends.fakes.torch_npu_fake import FLT_MAX

FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
ATOL = 1e-5


@pytest.fixture()
def npu():
    return FakeTorchNPU()


def _bnsd(b, n, s, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, s, d, generator=gen).to(dtype)


def _to_layout(x, layout):
    """[B, N, S, D] -> the op's layout."""
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    return x.contiguous()


def _from_layout(x, layout, n):
    if layout == "BSH":
        b, s, h = x.shape
        return x.view(b, s, n, h // n).transpose(1, 2)
    if layout == "SBH":
        s, b, h = x.shape
        return x.view(s, b, n, h // n).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.transpose(1, 2)
    return x


def _masked_oracle(q, k, v, kept, scale, dy=None):
    """fp64 autograd over a masked softmax: (out, lse, m, l, (dq, dk, dv)). q/k/v are [B,N,S,D]
    with equal head counts; kept broadcasts to [B,N,Sq,Skv] (True = attend)."""
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = scale * q64 @ k64.transpose(-1, -2)
    scores = scores.masked_fill(~kept, float("-inf"))
    m = scores.amax(-1)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    weights = torch.exp(scores - safe.unsqueeze(-1))
    l = weights.sum(-1)
    out = weights @ v64 / l.clamp_min(1e-300).unsqueeze(-1)
    out = torch.where((l > 0).unsqueeze(-1), out, torch.zeros(()).double())
    lse = safe + torch.log(l)
    grads = None
    if dy is not None:
        grads = torch.autograd.grad(out, (q64, k64, v64), dy.double())
    return out.detach(), lse.detach(), m.detach(), l.detach(), grads


def _close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=0)


# ------------------------------------------------------------------------- dense layouts
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_layouts_match_torch_flash_for_cpu(npu, layout, causal):
    b, n1, n2, s, d = 2, 4, 2, 12, 16
    q, k, v = _bnsd(b, n1, s, d, seed=1), _bnsd(b, n2, s, d, seed=2), _bnsd(b, n2, s, d, seed=3)
    dy = _bnsd(b, n1, s, d, seed=4)
    scale = 1 / math.sqrt(d)
    k_rep, v_rep = k.repeat_interleave(n1 // n2, 1), v.repeat_interleave(n1 // n2, 1)
    ref_out, ref_lse = FLASH_CPU(q, k_rep, v_rep, 0.0, causal, scale=scale)
    mask_kwargs = dict(atten_mask=compressed_causal_mask(), sparse_mode=2) if causal else {}

    out, smax, ssum, sout, seed, offset, numels = npu.npu_fusion_attention(
        _to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), n1, layout, scale=scale, **mask_kwargs)

    _close(_from_layout(out, layout, n1), ref_out)
    assert smax.shape == ssum.shape == (b, n1, s, 8) and smax.dtype == ssum.dtype == torch.float32
    assert torch.equal(smax, smax[..., :1].expand_as(smax)) and torch.equal(ssum, ssum[..., :1].expand_as(ssum))
    _close(smax[..., 0] + torch.log(ssum[..., 0]), ref_lse)
    assert sout.shape == (0,) and (seed, offset, numels) == (0, 0, b * n1 * s * s)

    grads = npu.npu_fusion_attention_grad(
        _to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), _to_layout(dy, layout), n1, layout,
        softmax_max=smax, softmax_sum=ssum, attention_in=out, scale_value=scale, **mask_kwargs)
    assert len(grads) == 4 and grads[3] is None
    ref_dq, ref_dk, ref_dv = FLASH_CPU_BACKWARD(dy, q, k_rep, v_rep, ref_out, ref_lse, 0.0, causal, scale=scale)
    _close(_from_layout(grads[0], layout, n1), ref_dq)
    _close(_from_layout(grads[1], layout, n2), ref_dk.unflatten(1, (n2, n1 // n2)).sum(2))
    _close(_from_layout(grads[2], layout, n2), ref_dv.unflatten(1, (n2, n1 // n2)).sum(2))


def test_autograd_of_forward_runs_the_grad_op(npu):
    q, k, v = (_bnsd(1, 2, 8, 16, seed=i).requires_grad_(True) for i in range(3))
    dy = _bnsd(1, 2, 8, 16, seed=9)
    out = npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3, atten_mask=compressed_causal_mask(), sparse_mode=2)[0]
    out.backward(dy)
    _, _, _, _, (dq, dk, dv) = _masked_oracle(q, k, v, torch.ones(8, 8).tril().bool(), 0.3, dy)
    _close(q.grad, dq)
    _close(k.grad, dk)
    _close(v.grad, dv)


def test_scale_defaults_to_one_not_inverse_sqrt_d(npu):
    q, k, v = (_bnsd(1, 2, 6, 16, seed=i) for i in range(3))
    out = npu.npu_fusion_attention(q, k, v, 2, "BNSD")[0]
    _close(out, FLASH_CPU(q, k, v, 0.0, False, scale=1.0)[0])


def test_no_mask_means_full_attention_whatever_the_sparse_mode(npu):
    q, k, v = (_bnsd(1, 2, 6, 16, seed=i) for i in range(3))
    full = npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25)[0]
    for mode in (2, 3, 4):
        out = npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25, sparse_mode=mode,
                                       pre_tockens=0, next_tockens=0)[0]
        assert torch.equal(out, full)


def test_bf16_output_dtype_and_accuracy(npu):
    q, k, v = (_bnsd(1, 2, 16, 32, seed=i) for i in range(3))
    out, smax, ssum = npu.npu_fusion_attention(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), 2, "BNSD", scale=0.2,
        atten_mask=compressed_causal_mask(), sparse_mode=2)[:3]
    assert out.dtype == torch.bfloat16 and smax.dtype == torch.float32
    ref_out, ref_lse = FLASH_CPU(q, k, v, 0.0, True, scale=0.2)
    _close(out, ref_out, atol=2e-2)
    _close(smax[..., 0] + ssum[..., 0].log(), ref_lse, atol=2e-2)


# ------------------------------------------------------------------------- masks and modes
def test_mode0_combines_mask_with_top_left_band(npu):
    b, n, sq, skv = 2, 2, 7, 9
    q, k, v = _bnsd(b, n, sq, 16, seed=1), _bnsd(b, n, skv, 16, seed=2), _bnsd(b, n, skv, 16, seed=3)
    mask = torch.rand(b, 1, sq, skv, generator=torch.Generator().manual_seed(5)) < 0.3
    pre, nxt = 2, 3
    i, j = torch.arange(sq).view(-1, 1), torch.arange(skv).view(1, -1)
    kept = ~mask & (j - i <= nxt) & (i - j <= pre)
    out, smax, ssum = npu.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=mask, scale=0.5,
                                               pre_tockens=pre, next_tockens=nxt)[:3]
    ref_out, ref_lse, ref_m, _, _ = _masked_oracle(q, k, v, kept, 0.5)
    _close(out, ref_out)
    _close(smax[..., 0], ref_m)
    _close(smax[..., 0] + ssum[..., 0].log(), ref_lse)


def test_mode1_uses_the_mask_only(npu):
    q, k, v = (_bnsd(1, 2, 6, 16, seed=i) for i in range(3))
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:, 4:] = True
    out = npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=mask, sparse_mode=1, pre_tockens=0, next_tockens=0)[0]
    _close(out, _masked_oracle(q, k, v, ~mask, 1.0)[0])


@pytest.mark.parametrize("mode,pre,nxt,expected_rows", [
    # off = Skv - Sq = 2; mode 3 keeps j <= i + off (bottom-right aligned causal)
    (3, 0, 0, [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]),
    # mode 2 keeps j <= i (top-left)
    (2, 0, 0, [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]),
    # mode 4: -pre <= (j - i) - off <= next with pre=1, next=0
    (4, 1, 0, [[1, 2], [2, 3], [3, 4], [4, 5]]),
])
def test_compressed_modes_keep_the_documented_region(npu, mode, pre, nxt, expected_rows):
    q, k, v = _bnsd(1, 1, 4, 16, seed=1), _bnsd(1, 1, 6, 16, seed=2), _bnsd(1, 1, 6, 16, seed=3)
    kept = torch.zeros(4, 6, dtype=torch.bool)
    for row, cols in enumerate(expected_rows):
        kept[row, cols] = True
    out = npu.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=compressed_causal_mask(), sparse_mode=mode,
                                   pre_tockens=pre, next_tockens=nxt)[0]
    _close(out, _masked_oracle(q, k, v, kept, 1.0)[0])


@pytest.mark.parametrize("mode", [5, 6])
def test_prefix_modes_keep_causal_or_prefix_columns(npu, mode):
    b, sq, skv = 2, 4, 6
    q, k, v = _bnsd(b, 1, sq, 16, seed=1), _bnsd(b, 1, skv, 16, seed=2), _bnsd(b, 1, skv, 16, seed=3)
    prefix = [0, 5]
    i, j = torch.arange(sq).view(-1, 1), torch.arange(skv).view(1, -1)
    kept = torch.stack([(j <= i + skv - sq) | (j < p) for p in prefix]).unsqueeze(1)  # [B, 1, Sq, Skv]
    if mode == 5:
        mask = ~kept  # the full B1SS mask
    else:  # compressed [3072, 2048]: causal triangle on top, bottom 1024 rows masked on the right half
        bottom = torch.zeros(1024, 2048, dtype=torch.bool)
        bottom[:, 1024:] = True
        mask = torch.cat([compressed_causal_mask(), bottom])
    out = npu.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=mode, prefix=prefix)[0]
    _close(out, _masked_oracle(q, k, v, kept, 1.0)[0])
    with pytest.raises(RuntimeError, match="prefix"):
        npu.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=mode, prefix=[1])


def test_fully_masked_rows_give_zero_output_and_the_kernels_finite_statistics(npu):
    q, k, v = _bnsd(1, 2, 6, 16, seed=1), _bnsd(1, 2, 4, 16, seed=2), _bnsd(1, 2, 4, 16, seed=3)
    out, smax, ssum = npu.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=compressed_causal_mask(),
                                               sparse_mode=3)[:3]
    # mode 3 with Sq=6 > Skv=4: rows 0 and 1 see no key (j <= i - 2)
    assert torch.equal(out[:, :, :2], torch.zeros_like(out[:, :, :2]))
    # the kernel writes max = -FLT_MAX and sum = +FLT_MAX there: a finite lse near -3.4e38
    assert (smax[:, :, :2] == -FLT_MAX).all() and (ssum[:, :, :2] == FLT_MAX).all()
    lse = smax[..., 0] + ssum[..., 0].log()
    assert torch.isfinite(lse).all() and (lse[:, :, :2] < -3e38).all() and (lse[:, :, 2:] > -1e3).all()
    assert out[:, :, 2:].abs().sum() > 0
    dy = _bnsd(1, 2, 6, 16, seed=4)
    dq = npu.npu_fusion_attention_grad(q, k, v, dy, 2, "BNSD", atten_mask=compressed_causal_mask(), sparse_mode=3,
                                       softmax_max=smax, softmax_sum=ssum, attention_in=out)[0]
    assert torch.isfinite(dq).all() and torch.equal(dq[:, :, :2], torch.zeros_like(dq[:, :, :2]))


def test_compressed_mask_shape_and_content_are_checked(npu):
    q = _bnsd(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match=r"\[2048, 2048\]"):
        npu.npu_fusion_attention(q, q, q, 1, "BNSD", atten_mask=torch.ones(4, 4).triu(1).bool(), sparse_mode=2)
    with pytest.raises(ValueError, match="triu"):
        npu.npu_fusion_attention(q, q, q, 1, "BNSD", atten_mask=~compressed_causal_mask(), sparse_mode=2)


def test_pse_is_added_before_scaling_and_gets_a_gradient(npu):
    q, k, v = (_bnsd(1, 2, 5, 16, seed=i) for i in range(3))
    pse = torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(7), requires_grad=True)
    out = npu.npu_fusion_attention(q, k, v, 2, "BNSD", pse=pse, scale=0.5)[0]
    dy = _bnsd(1, 2, 5, 16, seed=8)
    out.backward(dy)
    pse_ref = pse.detach().double().requires_grad_(True)
    ref = torch.softmax(0.5 * (q.double() @ k.double().transpose(-1, -2) + pse_ref), -1) @ v.double()
    ref.backward(dy.double())
    _close(out, ref.detach())
    _close(pse.grad, pse_ref.grad)


# ------------------------------------------------------------------------------ varlen TND
def _tnd(lengths, n, d, seed):
    return torch.randn(sum(lengths), n, d, generator=torch.Generator().manual_seed(seed))


def _per_sequence_oracle(q, k, v, q_lens, kv_lens, kept_fn, scale, dy=None):
    """Oracle on [T, N, D] inputs, one sequence at a time; kept_fn(b, sq, skv) -> [sq, skv]."""
    outs, lses, ms, grads = [], [], [], [[], [], []]
    n1, n2 = q.shape[1], k.shape[1]
    qs = ks = 0
    for b, (sq, skv) in enumerate(zip(q_lens, kv_lens)):
        if sq == 0:
            continue  # contributes no rows
        qb = q[qs:qs + sq].transpose(0, 1).unsqueeze(0)
        kb = k[ks:ks + skv].transpose(0, 1).unsqueeze(0).repeat_interleave(n1 // n2, 1)
        vb = v[ks:ks + skv].transpose(0, 1).unsqueeze(0).repeat_interleave(n1 // n2, 1)
        dyb = None if dy is None else dy[qs:qs + sq].transpose(0, 1).unsqueeze(0)
        out, lse, m, _, g = _masked_oracle(qb, kb, vb, kept_fn(b, sq, skv), scale, dyb)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
        ms.append(m[0])
        if g is not None:
            grads[0].append(g[0][0].transpose(0, 1))
            for slot, gk in ((1, g[1]), (2, g[2])):
                grads[slot].append(gk[0].unflatten(0, (n2, n1 // n2)).sum(1).transpose(0, 1))
        qs, ks = qs + sq, ks + skv
    return torch.cat(outs), lses, ms, [torch.cat(g) for g in grads] if dy is not None else None


def _causal(b, sq, skv):
    return torch.ones(sq, skv).tril(skv - sq).bool()


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
def test_tnd_varlen_causal_with_gqa_and_stats_order(softmax_layout):
    npu = FakeTorchNPU(release="7.2.0")
    lengths = [3, 5, 1, 4]
    cum = [3, 8, 9, 13]  # cumulative ends WITHOUT a leading 0
    n1, n2, d = 4, 2, 16
    q, k, v, dy = _tnd(lengths, n1, d, 1), _tnd(lengths, n2, d, 2), _tnd(lengths, n2, d, 3), _tnd(lengths, n1, d, 4)
    out, smax, ssum, _, _, _, numels = npu.npu_fusion_attention(
        q, k, v, n1, "TND", atten_mask=compressed_causal_mask(), sparse_mode=3, scale=0.25,
        actual_seq_qlen=cum, actual_seq_kvlen=cum, softmax_layout=softmax_layout)
    ref_out, ref_lses, ref_ms, ref_grads = _per_sequence_oracle(q, k, v, lengths, lengths, _causal, 0.25, dy)
    _close(out, ref_out)
    assert smax.shape == (13, n1, 8) and numels == n1 * sum(s * s for s in lengths)
    if softmax_layout == "TND":  # token-major [T, N, 8]
        expected_m = torch.cat([m.transpose(0, 1) for m in ref_ms])
    else:  # per-sequence N-major blocks: sequence b is an [N, s_b] block at offset cum[b-1] * N
        expected_m = torch.cat([m.reshape(-1) for m in ref_ms]).view(13, n1)
    _close(smax[..., 0], expected_m)
    assert torch.equal(smax, smax[..., :1].expand_as(smax))
    lse_flat = (smax[..., 0] + ssum[..., 0].log())
    if softmax_layout == "":
        _close(lse_flat.reshape(-1)[:3 * n1].view(n1, 3), ref_lses[0])
        _close(lse_flat.reshape(-1)[3 * n1:8 * n1].view(n1, 5), ref_lses[1])
    grads = npu.npu_fusion_attention_grad(
        q, k, v, dy, n1, "TND", atten_mask=compressed_causal_mask(), sparse_mode=3, scale_value=0.25,
        softmax_max=smax, softmax_sum=ssum, attention_in=out, actual_seq_qlen=cum, actual_seq_kvlen=cum,
        softmax_layout=softmax_layout)
    for got, expected in zip(grads[:3], ref_grads):
        _close(got, expected)


def test_tnd_zero_length_and_trailing_skipped_sequences(npu):
    n, d = 2, 16
    # [2, 2, 0, 2, 2] -> [2, 4, 4, 6, 8]
    lengths = [2, 2, 0, 2, 2]
    q, k, v = _tnd(lengths, n, d, 1), _tnd(lengths, n, d, 2), _tnd(lengths, n, d, 3)
    out = npu.npu_fusion_attention(q, k, v, n, "TND", atten_mask=compressed_causal_mask(), sparse_mode=3,
                                   actual_seq_qlen=[2, 4, 4, 6, 8], actual_seq_kvlen=[2, 4, 4, 6, 8])[0]
    _close(out, _per_sequence_oracle(q, k, v, lengths, lengths, _causal, 1.0)[0])
    # [2, 3, 4] used, two trailing batches skipped -> [2, 5, 9, 0, 0]
    lengths = [2, 3, 4]
    q, k, v = _tnd(lengths, n, d, 1), _tnd(lengths, n, d, 2), _tnd(lengths, n, d, 3)
    out = npu.npu_fusion_attention(q, k, v, n, "TND", actual_seq_qlen=[2, 5, 9, 0, 0],
                                   actual_seq_kvlen=[2, 5, 9, 0, 0])[0]
    _close(out, _per_sequence_oracle(q, k, v, lengths, lengths, lambda b, sq, skv: torch.ones(sq, skv).bool(), 1.0)[0])


def test_tnd_cumulative_list_errors(npu):
    q = _tnd([3, 5], 2, 16, 1)
    with pytest.raises(RuntimeError, match="must be the same and cannot be empty"):
        npu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[3, 8], actual_seq_kvlen=[8])
    with pytest.raises(RuntimeError, match="non-decreasing"):
        npu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[5, 3, 8], actual_seq_kvlen=[5, 3, 8])
    with pytest.raises(RuntimeError, match="only T=8"):
        npu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[3, 9], actual_seq_kvlen=[3, 9])
    with pytest.raises(TypeError, match="list of Python ints"):
        npu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=torch.tensor([3, 8]), actual_seq_kvlen=[3, 8])


def test_mode7_doc_example_last_sequence_is_the_band(npu):
    # Sequence 0: 3 queries x 4 keys (mode 3, bottom-right causal); sequence 1 is the doc's rank-1
    # block: 2 queries at global positions 2..3 over 6 keys, pre=6, next=-2 -> j <= i + 2.
    q_lens, kv_lens = [3, 2], [4, 6]
    q, k, v = _tnd(q_lens, 2, 16, 1), _tnd(kv_lens, 2, 16, 2), _tnd(kv_lens, 2, 16, 3)
    band = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    out = npu.npu_fusion_attention(q, k, v, 2, "TND", atten_mask=compressed_causal_mask(), sparse_mode=7,
                                   pre_tockens=6, next_tockens=-2, actual_seq_qlen=[3, 5], actual_seq_kvlen=[4, 10])[0]
    expected = _per_sequence_oracle(
        q, k, v, q_lens, kv_lens, lambda b, sq, skv: _causal(b, sq, skv) if b == 0 else band, 1.0)[0]
    _close(out, expected)
    with pytest.raises(RuntimeError, match="sparse_mode=7"):
        npu.npu_fusion_attention(q, k, v, 2, "TND", atten_mask=compressed_causal_mask(), sparse_mode=7,
                                 pre_tockens=6, next_tockens=1, actual_seq_qlen=[3, 5], actual_seq_kvlen=[4, 10])


def test_mode8_doc_example_first_sequence_is_the_band(npu):
    # Sequence 0 is the doc's rank-2 block: 3 queries x 4 keys, pre=4, next=1 -> -3 <= j - i <= 2;
    # sequence 1: 3 x 3 top-left causal (mode 2).
    q_lens, kv_lens = [3, 3], [4, 3]
    q, k, v = _tnd(q_lens, 2, 16, 1), _tnd(kv_lens, 2, 16, 2), _tnd(kv_lens, 2, 16, 3)
    band = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = npu.npu_fusion_attention(q, k, v, 2, "TND", atten_mask=compressed_causal_mask(), sparse_mode=8,
                                   pre_tockens=4, next_tockens=1, actual_seq_qlen=[3, 6], actual_seq_kvlen=[4, 7])[0]
    expected = _per_sequence_oracle(
        q, k, v, q_lens, kv_lens, lambda b, sq, skv: band if b == 0 else torch.ones(sq, skv).tril().bool(), 1.0)[0]
    _close(out, expected)


# ------------------------------------------------------------------------------ grad contract
def test_grad_uses_the_given_statistics_and_output(npu):
    q, k, v, dy = (_bnsd(1, 2, 6, 16, seed=i) for i in range(4))
    out, smax, ssum = npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3)[:3]
    base = npu.npu_fusion_attention_grad(q, k, v, dy, 2, "BNSD", softmax_max=smax, softmax_sum=ssum,
                                         attention_in=out, scale_value=0.3)
    # (max=lse, sum=1) is the same softmax: same gradients (what the backend passes)
    lse = (smax[..., :1] + ssum[..., :1].log()).expand_as(smax).contiguous()
    same = npu.npu_fusion_attention_grad(q, k, v, dy, 2, "BNSD", softmax_max=lse, softmax_sum=torch.ones_like(ssum),
                                         attention_in=out, scale_value=0.3)
    for a, b in zip(base[:3], same[:3]):
        _close(a, b)
    # doubling l halves P: dv halves exactly
    halved = npu.npu_fusion_attention_grad(q, k, v, dy, 2, "BNSD", softmax_max=smax, softmax_sum=2 * ssum,
                                           attention_in=out, scale_value=0.3)
    _close(halved[2], base[2] / 2)
    # a different attention_in changes D = rowsum(dy * O) and so dq: dS = P (dP - D)
    other = out + 0.1
    shifted = npu.npu_fusion_attention_grad(q, k, v, dy, 2, "BNSD", softmax_max=smax, softmax_sum=ssum,
                                            attention_in=other, scale_value=0.3)
    probs = torch.softmax(0.3 * q @ k.transpose(-1, -2), -1)
    delta_change = (dy * 0.1).sum(-1, keepdim=True)
    _close(shifted[0] - base[0], 0.3 * (probs * -delta_change) @ k)


def test_grad_returns_dsink_from_release_7_3_0():
    q, k, v, dy = (_bnsd(1, 1, 4, 16, seed=i) for i in range(4))
    for release, count in (("7.2.0", 4), ("7.3.0", 5), ("26.0.0", 5)):
        npu = FakeTorchNPU(release=release)
        out, smax, ssum = npu.npu_fusion_attention(q, k, v, 1, "BNSD")[:3]
        grads = npu.npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD", softmax_max=smax, softmax_sum=ssum,
                                              attention_in=out)
        assert len(grads) == count
        if count == 5:
            assert grads[4].shape == (0,)
    with pytest.raises(TypeError, match="softmax_layout"):
        FakeTorchNPU(release="7.1.0").npu_fusion_attention(q, k, v, 1, "BNSD", softmax_layout="")
    with pytest.raises(TypeError, match="sink"):
        FakeTorchNPU(release="7.2.0").npu_fusion_attention(q, k, v, 1, "BNSD", sink=None)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(head_num=0), RuntimeError, "head_num"),
    (dict(keep_prob=0.0), RuntimeError, r"keep_prob value must be in range of \(0, 1\]"),
    (dict(keep_prob=0.9), ValueError, "exact only for keep_prob == 1"),
    (dict(input_layout="XYZ"), RuntimeError, "BSH/SBH/BNSD/BSND/TND"),
    (dict(sparse_mode=7), RuntimeError, r"range of \[0,6\]"),
    (dict(head_num=3), RuntimeError, "must equal the N axis"),
    (dict(softmax_layout="BSH"), RuntimeError, "softmax_layout"),
    (dict(padding_mask=torch.ones(1)), ValueError, "padding_mask"),
])
def test_wrapper_validation_errors(npu, kwargs, error, match):
    q = _bnsd(1, 2, 4, 16)
    args = dict(query=q, key=q, value=q, head_num=2, input_layout="BNSD")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        npu.npu_fusion_attention(**args)


def test_rank_and_tnd_mode_errors(npu):
    with pytest.raises(RuntimeError, match="3 or 4 dimensional"):
        npu.npu_fusion_attention(torch.zeros(4, 16), torch.zeros(4, 16), torch.zeros(4, 16), 1, "BSH")
    q = _tnd([4], 1, 16, 0)
    with pytest.raises(RuntimeError, match=r"\[0,5\) or \(5,8\]"):
        npu.npu_fusion_attention(q, q, q, 1, "TND", sparse_mode=5, actual_seq_qlen=[4], actual_seq_kvlen=[4])
    # the layout is case-insensitive, like the wrapper
    lower = npu.npu_fusion_attention(q, q, q, 1, "tnd", actual_seq_qlen=[4], actual_seq_kvlen=[4])[0]
    assert lower.shape == q.shape


def test_tnd_tokens_beyond_the_lengths_are_left_uninitialised(npu):
    """The kernel accepts T > the last cumulative end and does not write the tail rows."""
    q = _tnd([3, 5], 2, 16, 1)
    out, smax, ssum = npu.npu_fusion_attention(q, q, q, 2, "TND", actual_seq_qlen=[3, 7],
                                               actual_seq_kvlen=[3, 7])[:3]
    assert out.shape == q.shape and smax.shape == (8, 2, 8)
    assert torch.isnan(out[7]).all() and torch.isfinite(out[:7]).all()
    ref = npu.npu_fusion_attention(q[:7], q[:7], q[:7], 2, "TND", actual_seq_qlen=[3, 7],
                                   actual_seq_kvlen=[3, 7])[0]
    _close(out[:7], ref)
    assert torch.isnan(smax.reshape(-1)[7 * 2 * 8:]).all()


def test_tnd_sparse_mode_2_is_top_left_for_any_lengths_and_mode_3_refuses_longer_queries(npu):
    q_lens, kv_lens = [4, 2], [2, 5]
    q, k, v = _tnd(q_lens, 1, 16, 1), _tnd(kv_lens, 1, 16, 2), _tnd(kv_lens, 1, 16, 3)
    out = npu.npu_fusion_attention(q, k, v, 1, "TND", atten_mask=compressed_causal_mask(), sparse_mode=2,
                                   actual_seq_qlen=[4, 6], actual_seq_kvlen=[2, 7])[0]
    top_left = _per_sequence_oracle(q, k, v, q_lens, kv_lens, lambda b, sq, skv: torch.ones(sq, skv).tril().bool(),
                                    1.0)[0]
    _close(out, top_left)
    with pytest.raises(RuntimeError, match="Sq <= Skv per sequence"):
        npu.npu_fusion_attention(q, k, v, 1, "TND", atten_mask=compressed_causal_mask(), sparse_mode=3,
                                 actual_seq_qlen=[4, 6], actual_seq_kvlen=[2, 7])


def test_documented_limits_are_enforced(npu):
    q = torch.zeros(1, 1, 2, 769)
    with pytest.raises(RuntimeError, match=r"head dim D must be in \[1, 768\]"):
        npu.npu_fusion_attention(q, q, q, 1, "BNSD")
    ok = torch.zeros(1, 1, 2, 768)
    npu.npu_fusion_attention(ok, ok, ok, 1, "BNSD")
    q = torch.zeros(1, 257, 1, 16)
    with pytest.raises(RuntimeError, match=r"head_num must be in \[1, 256\]"):
        npu.npu_fusion_attention(q, q, q, 257, "BNSD")
    big = torch.zeros(1024 * 1024 + 1, 1, 1)
    with pytest.raises(RuntimeError, match="at most 1048576"):
        npu.npu_fusion_attention(big, big, big, 1, "TND", actual_seq_qlen=[big.shape[0]],
                                 actual_seq_kvlen=[big.shape[0]])
    many = torch.zeros(2049, 1, 16)
    cum = list(range(1, 2050))
    with pytest.raises(RuntimeError, match="at most 2048"):
        npu.npu_fusion_attention(many, many, many, 1, "TND", actual_seq_qlen=cum, actual_seq_kvlen=cum)
    npu.npu_fusion_attention(many[:2048], many[:2048], many[:2048], 1, "TND", actual_seq_qlen=cum[:2048],
                             actual_seq_kvlen=cum[:2048])


def test_rotary_is_4d_only_before_7_3_0():
    x, cos = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    with pytest.raises(RuntimeError, match="must be 4-D on torch_npu 7.2.0"):
        FakeTorchNPU(release="7.2.0").npu_rotary_mul(x, cos, cos)
    out = FakeTorchNPU(release="7.3.0").npu_rotary_mul(x, cos, cos)
    _close(out, x * cos + _rotate_half(x) * cos)
    four_d = FakeTorchNPU(release="7.2.0").npu_rotary_mul(x[:, None], cos[:, None], cos[:, None])
    torch.testing.assert_close(four_d[:, 0], out, atol=0, rtol=0)


def test_rotary_casts_cos_and_sin_to_the_dtype_of_x(npu):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 2, 16, generator=gen).to(torch.bfloat16)
    angles = torch.randn(4, 1, 1, 16, generator=gen)
    out = npu.npu_rotary_mul(x, angles.cos(), angles.sin())  # fp32 cos/sin, bf16 x: accepted
    assert out.dtype == torch.bfloat16
    cast = npu.npu_rotary_mul(x, angles.cos().bfloat16(), angles.sin().bfloat16())
    torch.testing.assert_close(out, cast, atol=0, rtol=0)


# ----------------------------------------------------------------------------- fused layers
def test_rms_norm_values_rstd_shape_and_grad(npu):
    x = torch.randn(24, 1, 128, generator=torch.Generator().manual_seed(0), requires_grad=True)
    gamma = torch.randn(128, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, rstd = npu.npu_rms_norm(x, gamma, epsilon=1e-5)
    assert rstd.shape == (24, 1, 1) and rstd.dtype == torch.float32 and y.dtype == x.dtype
    x64, g64 = x.detach().double().requires_grad_(True), gamma.detach().double().requires_grad_(True)
    ref_rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = x64 * ref_rstd * g64
    _close(y, ref.detach())
    _close(rstd, ref_rstd.detach())
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    _close(x.grad, x64.grad, atol=1e-4)
    _close(gamma.grad, g64.grad, atol=1e-4)
    with pytest.raises(RuntimeError, match="dtype pair"):
        npu.npu_rms_norm(x.detach(), gamma.detach().bfloat16())


def test_rms_norm_two_normalised_axes(npu):
    x = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    gamma = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    y, rstd = npu.npu_rms_norm(x, gamma)
    assert rstd.shape == (3, 1, 1)
    _close(y, x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * gamma)


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


@pytest.mark.parametrize("cos_shape", [(1, 6, 1, 16), (2, 6, 1, 16), (2, 6, 3, 16)])
def test_rotary_half_matches_rotate_half_formula_and_grads(npu, cos_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 16, generator=gen, requires_grad=True)  # BSND
    angles = torch.randn(cos_shape, generator=gen)
    cos, sin = angles.cos().requires_grad_(True), angles.sin().requires_grad_(True)
    out = npu.npu_rotary_mul(x, cos, sin)
    ref_x, ref_cos, ref_sin = (t.detach().double().requires_grad_(True) for t in (x, cos, sin))
    ref = ref_x * ref_cos + _rotate_half(ref_x) * ref_sin
    _close(out, ref.detach())
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    for got, expected in ((x.grad, ref_x.grad), (cos.grad, ref_cos.grad), (sin.grad, ref_sin.grad)):
        _close(got, expected, atol=1e-4)


def test_rotary_interleave_pairs_and_shape_rules(npu):
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])  # [1, 1, 1, 4]
    cos, sin = torch.zeros(1, 1, 1, 4), torch.ones(1, 1, 1, 4)
    # interleave: (x0, x1) -> (-x1, x0)
    interleaved = npu.npu_rotary_mul(x, cos, sin, rotary_mode="interleave")
    assert torch.equal(interleaved, torch.tensor([[[[-2.0, 1.0, -4.0, 3.0]]]]))
    assert torch.equal(npu.npu_rotary_mul(x, cos, sin), torch.tensor([[[[-3.0, -4.0, 1.0, 2.0]]]]))
    x = torch.randn(2, 6, 3, 16)
    with pytest.raises(RuntimeError, match="not a supported broadcast"):
        npu.npu_rotary_mul(x, torch.ones(2, 6, 1, 16), torch.ones(2, 6, 1, 16), rotary_mode="interleave")
    with pytest.raises(RuntimeError, match="x's rank"):
        npu.npu_rotary_mul(x, torch.ones(6, 16), torch.ones(6, 16))


def test_swiglu_gate_is_the_first_half(npu):
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = npu.npu_swiglu(x)
    assert out.shape == (3, 5, 4)
    ref_x = x.detach().double().requires_grad_(True)
    ref = F.silu(ref_x[..., :4]) * ref_x[..., 4:]
    _close(out, ref.detach())
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy.double())
    _close(x.grad, ref_x.grad)
    along_dim0 = npu.npu_swiglu(x.detach().transpose(0, 2).contiguous(), dim=0)
    _close(along_dim0.transpose(0, 2), ref.detach())
    with pytest.raises(RuntimeError, match="even"):
        npu.npu_swiglu(torch.ones(3, 5))
    with pytest.raises(RuntimeError, match="contiguous"):
        npu.npu_swiglu(torch.ones(4, 6).t())


# ----------------------------------------------------------------------------- torch.npu
def _resident_bytes():
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_device_namespace_runs_on_cpu():
    npu = FakeTorchNPU(device_count=2).npu
    assert npu.is_available() and npu.device_count() == 2 and npu.current_device() == 0
    npu.set_device("npu:1")
    assert npu.current_device() == 1
    npu.set_device(0)
    assert npu.current_device() == 0
    with pytest.raises(RuntimeError, match="Invalid device ordinal 2"):
        npu.set_device(2)
    npu.synchronize()
    npu.manual_seed(1234)
    assert npu.initial_seed() == 1234
    npu.manual_seed_all(7)
    assert npu.seed_calls == [("manual_seed", 1234), ("manual_seed_all", 7)]
    npu.reset_peak_memory_stats()
    assert npu.reset_calls == 1
    block = torch.ones(16 * 1024 * 1024 // 4)  # 16 MiB, touched
    assert npu.max_memory_allocated() >= _resident_bytes() >= block.numel() * 4
    del block
    assert not FakeTorchNPU(device_count=0).npu.is_available()
