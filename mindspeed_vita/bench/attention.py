"""`mindspeed-vita bench attention`: the backend's attention kernel vs naive PyTorch attention.

For each sequence length both implementations run forward + backward (or forward only) on the
same causal GQA input; the table prints time and peak-memory of each and the ratios
naive / backend, all measured in this run. The naive baseline materialises the [s, s] score
matrix per head (what a plain `softmax(q k^T) v` does); it is skipped, with the estimate
printed, where that estimate exceeds `--naive-max-gb`, or where the device runs out of memory
for it (the row says so; ci/run_gpu_tests.sh sizes the budget from the GPU's free memory).

Defaults: 2K, 4K, 8K and 16K tokens, 2 query / 1 kv heads of dim 64, bf16 on accelerators and
fp32 on CPU, `--naive-max-gb 12`. The naive forward+backward needs about 6 score matrices:
at 16K tokens in fp32 that is ~12.3 GiB, so on CPU it is skipped by default (the backend row
is still measured); in bf16 on a GPU it is ~6.3 GiB and runs. `--attention-impl` picks the
CUDA kernels (PyTorch's flash kernels or the flash-attn package).
"""
from __future__ import annotations

import math

import torch

from mindspeed_vita.bench.common import format_bytes, format_table, measure, print_json


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The baseline: causal softmax(q k^T / sqrt(d)) v with the full score matrix, [b,s,n,d]."""
    n_q, n_kv, s = q.shape[2], k.shape[2], q.shape[1]
    k = k.repeat_interleave(n_q // n_kv, dim=2)
    v = v.repeat_interleave(n_q // n_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.ones(s, s, dtype=torch.bool, device=q.device).triu_(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def _naive_estimate_bytes(s: int, heads: int, elem: int, backward: bool) -> int:
    # [heads, s, s] matrices alive at the peak, plus the bool mask: measured on CPU fp32 the
    # fwd+bwd peak is ~3 matrices (probs saved for backward, scores, one gradient) - 1.6 GiB at
    # 8K with 2 heads; one matrix of headroom keeps the estimate an upper bound
    per_matrix = heads * s * s * elem
    return per_matrix * (4 if backward else 3) + s * s


def _step(attn, q, k, v, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

    def run():
        out = attn(*leaves)
        if backward:
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
    return run


def run(args) -> int:
    from backends import get_backend
    from backends.attention_params import AttentionParams

    options = {} if args.attention_impl is None else {"attention_impl": args.attention_impl}
    backend = get_backend(args.backend, **options)
    dev = backend.device()
    dtype = getattr(torch, args.dtype) if args.dtype else backend.default_compute_dtype
    seq_lens = args.seq_length
    backward = not args.forward_only
    elem = torch.tensor([], dtype=dtype).element_size()
    results = []
    for s in seq_lens:
        g = torch.Generator().manual_seed(s)
        mk = lambda n: torch.randn(1, s, n, args.head_dim, generator=g).to(dev, dtype)  # noqa: E731
        q, k, v = mk(args.heads), mk(args.kv_heads), mk(args.kv_heads)
        causal = AttentionParams.dense("causal")
        fast = measure(_step(lambda a, b, c: backend.attention(a, b, c, causal), q, k, v,
                             backward), backend, repeats=args.repeats)
        row = {"seq_len": s, "backend_time_s": fast["time_s"],
               "backend_peak_bytes": fast["peak_bytes"]}
        estimate = _naive_estimate_bytes(s, args.heads, elem, backward)
        slow = None
        if estimate <= args.naive_max_gb * 2**30:
            try:
                slow = measure(_step(naive_attention, q, k, v, backward), backend,
                               repeats=args.repeats)
            except torch.OutOfMemoryError:  # the device had less free than the budget said
                row.update(naive_out_of_memory=True)
        if slow is not None:
            row.update(naive_time_s=slow["time_s"], naive_peak_bytes=slow["peak_bytes"],
                       speedup=slow["time_s"] / max(fast["time_s"], 1e-12),
                       memory_ratio=slow["peak_bytes"] / max(fast["peak_bytes"], 1))
        else:
            row.update(naive_skipped_estimate_bytes=estimate)
        results.append(row)
        del q, k, v
    summary = {"backend": backend.name, "dtype": str(dtype).removeprefix("torch."),
               "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
               "pass": "forward" if args.forward_only else "forward+backward", "results": results}
    kernels = backend.describe().get("attention_kernels")
    if kernels is not None:
        summary["attention_kernels"] = kernels
    if args.json:
        print_json(summary)
        return 0
    kernels = f", {kernels} kernels" if kernels is not None else ""
    print(f"attention on backend {backend.name}{kernels} ({summary['dtype']}, {summary['pass']}, "
          f"causal, {args.heads} q heads / {args.kv_heads} kv heads, head dim {args.head_dim})")
    rows = []
    for r in results:
        if "speedup" in r:
            naive = (f"{r['naive_time_s']:.4f}", format_bytes(r["naive_peak_bytes"]),
                     f"{r['speedup']:.2f}x", f"{r['memory_ratio']:.1f}x")
        else:
            why = "out of memory" if r.get("naive_out_of_memory") else "skipped"
            naive = (why, f"~{format_bytes(r['naive_skipped_estimate_bytes'])}", "-", "-")
        rows.append((r["seq_len"], f"{r['backend_time_s']:.4f}",
                     format_bytes(r["backend_peak_bytes"])) + naive)
    print(format_table(["tokens", "backend s", "backend peak", "naive s", "naive peak",
                        "time ratio naive/backend", "memory ratio naive/backend"], rows))
    return 0
