"""GPU audit of the CUDA backend: the figures issue 12 asks for, in one run of a few minutes.

    python ci/gpu_audit.py --out DIR/audit.json         (ci/run_gpu_tests.sh calls it)
    AUDIT_DEVICE=cpu python ci/gpu_audit.py --out X     (dry run through the CPU kernel fakes,
                                                         tiny shapes: checks this script in CI)

Every check is independent: one that fails records its exception and the next one runs. Each
prints `[audit] name: {...}` lines and lands under `checks` in the JSON record:

* syncs: host-device synchronisations (torch.cuda.set_sync_debug_mode warnings) per attention
  forward+backward - dense causal, megatron's transposed sbhd views, the ViT's unbind views of
  a fused qkv, packed with host lengths (causal, bottom-right, top-left split), one decode step
  (dense and packed) - and per fused-layer call. Expected 0 everywhere but the top-left split.
* strided: bytes allocated beyond out + lse by a forward on the ViT's q/k/v views (0 when the
  views reach the kernel uncopied), and its time vs contiguous inputs.
* edge: decode with GQA and an empty query segment (the kernel's max_seqlen_q == 1 path), dense
  top-left causal with s_q != s_kv, fp32 / mixed-dtype inputs; errors vs the reference.
* deterministic: the backward twice under torch.use_deterministic_algorithms(True), per impl.
* kernels: forward and forward+backward time, TFLOP/s and peak memory of the backend (each
  kernel implementation) vs PyTorch SDPA flash and cuDNN on the same inputs, for the benchmark's
  default shapes (2 q / 1 kv heads of dim 64) and a Qwen2-like layout (28 q / 4 kv, dim 128).
* fused: reference vs fused RMSNorm / RoPE / SwiGLU: time, bytes kept for backward, error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backends.cuda as cuda_module  # noqa: E402
from backends import cuda_fused, reference  # noqa: E402
from backends.attention_params import AttentionParams  # noqa: E402
from backends.cuda import CUDABackend  # noqa: E402

DRY = os.environ.get("AUDIT_DEVICE") == "cpu"
DEV = torch.device("cpu" if DRY else "cuda")
BF16 = torch.bfloat16
SHRINK = 128 if DRY else 1  # sequence lengths / SHRINK in the dry run
RECORD = {"dry_run": DRY, "checks": {}}
_ATEN = torch.ops.aten
if DRY:  # this script's logic on CPU through the CI fakes of the flash kernels
    from backends.fakes.flash_fake import FakeAtenFlash

    cuda_module._device_reason = lambda device: None
    _ATEN = FakeAtenFlash()


def say(check: str, key: str, value) -> None:
    """Print one figure and record it under checks[check][key]."""
    RECORD["checks"].setdefault(check, {})[key] = value
    print(f"[audit] {check}: {key} = {json.dumps(value, default=str)}", flush=True)


CHECKS = []


def check(fn):
    """Register a check; `main` runs them in order."""
    CHECKS.append(fn)
    return fn


def run_check(fn) -> None:
    """Run one check; an exception is recorded and the next check runs."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the audit reports every failure and goes on
        text = str(exc).strip().splitlines()
        say(fn.__name__, "EXCEPTION", f"{type(exc).__name__}: {text[0][:300] if text else ''}")
        traceback.print_exc(limit=4)


def rnd(*shape, seed, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype)


def backend(impl: str = "torch") -> CUDABackend:
    b = CUDABackend(attention_impl=impl)
    if DRY:
        b._aten = _ATEN
    return b


def impls():
    """The kernel implementations to measure: torch, plus flash_attn when it loads."""
    found = ["torch"]
    if DRY:
        return found
    try:
        CUDABackend(attention_impl="flash_attn")._kernels()
        found.append("flash_attn")
    except Exception as exc:  # noqa: BLE001
        say("env", "flash_attn", f"unusable: {type(exc).__name__}: {str(exc)[:200]}")
    return found


def sync():
    if not DRY:
        torch.cuda.synchronize()


def timed_ms(fn, iters: int = 10, warmup: int = 2) -> float:
    """Mean wall time per call in ms, device work included (one call in the dry run)."""
    if DRY:
        iters, warmup = 1, 0
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return round((time.perf_counter() - start) / iters * 1e3, 4)


def peak_growth_bytes(fn) -> int:
    """Peak bytes allocated by fn above what was live before it (0 in the dry run)."""
    if DRY:
        fn()
        return 0
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return int(torch.cuda.max_memory_allocated() - base)


def count_syncs(fn):
    """Synchronising CUDA calls made by fn (set_sync_debug_mode warns on each)."""
    if DRY:
        fn()
        return "n/a (dry run)"
    fn()  # warm: lazy inits (kernel binding, cuBLAS handles) are not per-call work
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def fwd_bwd(b, q, k, v, params):
    """A closure: backend.attention forward + backward through autograd."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]

    def run():
        out = b.attention(*leaves, params)
        out.backward(torch.ones_like(out))
        for t in leaves:
            t.grad = None
    return run


# ------------------------------------------------------------------------------- checks
@check
def env():
    say("env", "torch", torch.__version__)
    if not DRY:
        say("env", "gpu", f"{torch.cuda.get_device_name()} sm"
            f"{''.join(map(str, torch.cuda.get_device_capability()))}, CUDA {torch.version.cuda}"
            f", cuDNN {torch.backends.cudnn.version()}")
        free, total = torch.cuda.mem_get_info()
        say("env", "memory_gib", {"free": round(free / 2**30, 1), "total": round(total / 2**30, 1)})
        for op in ("_flash_attention_forward", "_flash_attention_backward"):
            say("env", op, str(getattr(_ATEN, op).default._schema))
    say("env", "impls", impls())


@check
def syncs():
    b = backend()
    s, nq, nk, d = 4096 // SHRINK, 28, 4, 128
    q, k, v = rnd(1, s, nq, d, seed=1), rnd(1, s, nk, d, seed=2), rnd(1, s, nk, d, seed=3)
    causal = AttentionParams.dense("causal")
    say("syncs", "dense_causal_fwd_bwd", count_syncs(fwd_bwd(b, q, k, v, causal)))
    # megatron's core attention hands [s, b, n, d] tensors over as transposed [b, s, n, d] views
    sq, sk, sv = (rnd(s // 2, 2, n, d, seed=i) for i, n in ((4, nq), (5, nk), (6, nk)))
    say("syncs", "dense_sbhd_views_fwd_bwd",
        count_syncs(fwd_bwd(b, sq.transpose(0, 1), sk.transpose(0, 1), sv.transpose(0, 1),
                            causal)))
    # the ViT: q/k/v are unbind views of one fused qkv projection; no mask
    tiles, tokens, heads, hd = 4, 1025 // SHRINK + 8, 16, 64
    qkv = rnd(tiles, tokens, 3, heads, hd, seed=7)
    say("syncs", "vit_unbind_views_fwd_bwd",
        count_syncs(fwd_bwd(b, *qkv.unbind(2), AttentionParams.dense("none"))))
    cu = [0, s // 4, s // 2, s]
    packed = AttentionParams.packed(cu, mask="causal", device=DEV)
    pq, pk, pv = (x[0] for x in (q, k, v))
    say("syncs", "packed_causal_host_lengths_fwd_bwd", count_syncs(fwd_bwd(b, pq, pk, pv, packed)))
    cu_kv = [0, s // 2, s // 2 + s // 4, s]  # a ring-like step: other kv lengths, bottom-right
    ring = AttentionParams.packed(cu, cu_kv, mask="causal_bottom_right", device=DEV)
    say("syncs", "packed_bottom_right_distinct_kv_fwd_bwd",
        count_syncs(fwd_bwd(b, pq, pk, pv, ring)))
    split = AttentionParams.packed(cu, cu_kv, mask="causal", device=DEV)
    say("syncs", "packed_top_left_split_fwd_bwd (index copies)",
        count_syncs(fwd_bwd(b, pq, pk, pv, split)))
    with torch.no_grad():
        q1 = rnd(1, 1, nq, d, seed=8)
        decode = AttentionParams.dense("causal_bottom_right")
        say("syncs", "decode_step_dense", count_syncs(lambda: b.attention(q1, k, v, decode)))
        lengths = [s // 4, s // 8, s // 2, s // 8]
        cu_cache = [0]
        for n in lengths:
            cu_cache.append(cu_cache[-1] + n)
        step = AttentionParams.packed(list(range(5)), cu_cache, mask="causal_bottom_right",
                                      device=DEV)
        qd = rnd(4, nq, d, seed=9)
        kd, vd = rnd(cu_cache[-1], nk, d, seed=10), rnd(cu_cache[-1], nk, d, seed=11)
        say("syncs", "decode_step_packed_4_sequences",
            count_syncs(lambda: b.attention(qd, kd, vd, step)))
    x, w = rnd(s, 1, 3584, seed=12), rnd(3584, seed=13)
    layers = cuda_fused.CUDAFusedLayers()

    def norm():
        xl = x.detach().requires_grad_(True)
        layers.rms_norm(xl, w, 1e-6).sum().backward()
    say("syncs", "rms_norm_fwd_bwd", count_syncs(norm))
    cos, sin = rnd(s, 1, 1, d, seed=14), rnd(s, 1, 1, d, seed=15)

    def rope():
        ql = q.transpose(0, 1).detach().requires_grad_(True)
        layers.apply_rotary(ql, cos, sin).sum().backward()
    say("syncs", "rotary_fwd_bwd", count_syncs(rope))


@check
def strided():
    b = backend()
    tiles, tokens, heads, hd = 8, 1025 // SHRINK + 8, 16, 64
    qkv = rnd(tiles, tokens, 3, heads, hd, seed=20)
    views = qkv.unbind(2)
    copies = [t.contiguous() for t in views]
    params = AttentionParams.dense("none")
    out_bytes = views[0].numel() * views[0].element_size() + tiles * heads * tokens * 4
    peak = peak_growth_bytes(lambda: b.attention_forward(*views, params))
    say("strided", "forward_bytes_beyond_out_and_lse (views)",
        "n/a (dry run)" if DRY else peak - out_bytes)
    say("strided", "forward_ms views / contiguous",
        [timed_ms(lambda: b.attention_forward(*views, params)),
         timed_ms(lambda: b.attention_forward(*copies, params))])
    out, _ = b.attention_forward(*views, params)
    ref, _ = reference.attention_reference(*(t.float() for t in views), params)
    say("strided", "max_err_vs_fp32_reference", (out.float() - ref).abs().max().item())


@check
def edge():
    b = backend()
    # decode with GQA where one sequence has no new query (max_seqlen_q == 1 fast path)
    q, k, v = rnd(2, 8, 64, seed=30), rnd(12, 2, 64, seed=31), rnd(12, 2, 64, seed=32)
    params = AttentionParams.packed([0, 1, 1, 2], [0, 5, 9, 12], mask="causal_bottom_right",
                                    device=DEV)
    out, lse = b.attention_forward(q, k, v, params)
    ref, _ = reference.attention_reference(q.float(), k.float(), v.float(), params)
    say("edge", "decode_gqa_empty_segment_max_err", (out.float() - ref).abs().max().item())
    # dense top-left causal with more queries than keys (split into two kernel calls)
    q, k, v = rnd(2, 40, 4, 64, seed=33), rnd(2, 12, 2, 64, seed=34), rnd(2, 12, 2, 64, seed=35)
    params = AttentionParams.dense("causal")
    out, lse = b.attention_forward(q, k, v, params)
    ref, ref_lse = reference.attention_reference(q.float(), k.float(), v.float(), params)
    say("edge", "dense_top_left_q_longer_max_err", (out.float() - ref).abs().max().item())
    for name, args in (("fp32", [t.float() for t in (q, k, v)]),
                       ("mixed_q_fp32", [q.float(), k, v])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out, _ = b.attention_forward(*args, params)
                result = {"out_dtype": str(out.dtype),
                          "max_err": (out.float() - ref).abs().max().item()}
            except Exception as exc:  # noqa: BLE001 - a clear refusal is a valid outcome
                result = {"raised": f"{type(exc).__name__}: {str(exc)[:200]}"}
        result["warnings"] = [str(w.message)[:160] for w in caught]
        say("edge", name, result)


@check
def deterministic():
    t, nq, nk, d = 8192 // SHRINK, 28, 4, 128
    q, k, v = rnd(t, nq, d, seed=40), rnd(t, nk, d, seed=41), rnd(t, nk, d, seed=42)
    dout = rnd(t, nq, d, seed=43)
    params = AttentionParams.packed([0, t // 2, t], mask="causal", device=DEV)
    for impl in impls():
        b = backend(impl)
        out, lse = b.attention_forward(q, k, v, params)
        for flag in (False, True):
            # warn_only=False: with warn_only=True PyTorch's flash backward stays
            # non-deterministic (it only warns)
            torch.use_deterministic_algorithms(flag)
            try:
                first = b.attention_backward(dout, q, k, v, out, lse, params)
                second = b.attention_backward(dout, q, k, v, out, lse, params)
                peak = peak_growth_bytes(
                    lambda: b.attention_backward(dout, q, k, v, out, lse, params))
            finally:
                torch.use_deterministic_algorithms(False)
            say("deterministic", f"{impl} deterministic={flag}",
                {"bitwise_equal_twice": all(torch.equal(a, c) for a, c in zip(first, second)),
                 "backward_peak_gib": round(peak / 2**30, 3)})


def _sdpa_runner(kind, q, k, v, backward):
    """SDPA on [b, n, s, d] views of our [b, s, n, d] tensors, with one backend forced; GQA
    natively where the backend takes it, else with k/v expanded (named in the result key)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[kind]
    group = q.shape[2] // k.shape[2]

    def make(expand):
        kk, vv = ((x.repeat_interleave(group, dim=2) for x in (k, v)) if expand else (k, v))
        leaves = [t.transpose(1, 2).detach().requires_grad_(backward) for t in (q, kk, vv)]

        def run():
            with sdpa_kernel(kernel):
                out = F.scaled_dot_product_attention(*leaves, is_causal=True,
                                                     enable_gqa=not expand and group > 1)
                if backward:
                    out.backward(torch.ones_like(out))
                    for t in leaves:
                        t.grad = None
        return run

    try:
        run = make(False)
        run()
        return f"sdpa_{kind}", run
    except RuntimeError:
        run = make(True)
        run()
        return f"sdpa_{kind} (kv expanded)", run


@check
def kernels():
    configs = {"default_2q_1kv_d64": (2, 1, 64, [2048, 4096, 8192, 16384]),
               "qwen2_28q_4kv_d128": (28, 4, 128, [4096, 8192, 16384, 32768])}
    for name, (nq, nk, d, lengths) in configs.items():
        rows = []
        for s in lengths[:2] if DRY else lengths:
            s //= SHRINK
            q, k, v = rnd(1, s, nq, d, seed=s), rnd(1, s, nk, d, seed=s + 1), \
                rnd(1, s, nk, d, seed=s + 2)
            params = AttentionParams.dense("causal")
            flops_fwd = 4 * s * s * nq * d / 2  # causal: half the score matrix
            row = {"seq_len": s}
            runners = {}
            for impl in impls():
                b = backend(impl)
                runners[f"backend_{impl}"] = (
                    lambda b=b, q=q, k=k, v=v: b.attention(q, k, v, params),
                    fwd_bwd(b, q, k, v, params))
            if not DRY:
                for kind in ("flash", "cudnn"):
                    try:
                        label, fwd = _sdpa_runner(kind, q, k, v, backward=False)
                        _, both = _sdpa_runner(kind, q, k, v, backward=True)
                        runners[label] = (fwd, both)
                    except Exception as exc:  # noqa: BLE001 - unavailable kernels are a result
                        row[f"sdpa_{kind}"] = f"unavailable: {str(exc).splitlines()[0][:120]}"
            for label, (fwd, both) in runners.items():
                with torch.no_grad():
                    fwd_ms = timed_ms(fwd)
                both_ms = timed_ms(both, iters=5)
                row[label] = {
                    "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms,
                    "fwd_tflops": round(flops_fwd / (fwd_ms * 1e-3) / 1e12, 1),
                    # backward = 2.5x the forward's flops (FlashAttention-2 paper's count)
                    "fwd_bwd_tflops": round(3.5 * flops_fwd / (both_ms * 1e-3) / 1e12, 1),
                    "fwd_bwd_peak_mib": round(peak_growth_bytes(both) / 2**20, 1)}
            rows.append(row)
            say("kernels", f"{name} s={s}", row)
            del q, k, v
        RECORD["checks"]["kernels"][name] = rows


@check
def fused():
    s, hidden, heads, d, ffn = 8192 // SHRINK, 3584, 28, 128, 18944 // (16 if DRY else 1)
    layers = cuda_fused.CUDAFusedLayers()
    x, w = rnd(s, 1, hidden, seed=50), 1 + 0.1 * rnd(hidden, seed=51)
    xr = rnd(s, 1, heads, d, seed=52)
    angles = rnd(s, 1, 1, d, seed=53, dtype=torch.float32)
    cos, sin = angles.cos().to(BF16), angles.sin().to(BF16)
    xs = rnd(s, 1, 2 * ffn, seed=54)
    cases = {
        "rms_norm": (lambda a: reference.rms_norm_reference(a, w, 1e-6),
                     lambda a: layers.rms_norm(a, w, 1e-6), x),
        "rotary": (lambda a: reference.rotary_reference(a, cos, sin),
                   lambda a: layers.apply_rotary(a, cos, sin), xr),
        "swiglu": (reference.swiglu_reference, layers.swiglu, xs),
    }
    for name, (ref_fn, fused_fn, a) in cases.items():
        result = {}
        for label, fn in (("reference", ref_fn), ("fused", fused_fn)):
            def run(fn=fn):
                leaf = a.detach().requires_grad_(True)
                out = fn(leaf)
                out.backward(torch.ones_like(out))
                return out.detach()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
                out = fn(a.detach().requires_grad_(True))
            result[label] = {"fwd_bwd_ms": timed_ms(run),
                             "saved_mib": round(sum(saved) / 2**20, 1),
                             "fwd_bwd_peak_mib": round(peak_growth_bytes(run) / 2**20, 1)}
            result.setdefault("outs", []).append(out.detach())
        ref_out, fused_out = result.pop("outs")
        result["max_abs_diff"] = (ref_out.float() - fused_out.float()).abs().max().item()
        say("fused", name, result)
    say("fused", "compiled", {"rotary": layers._rotary._usable, "swiglu": layers._swiglu._usable})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where the JSON record goes")
    args = parser.parse_args(argv)
    for fn in CHECKS:
        run_check(fn)
    with open(args.out, "w") as f:
        json.dump(RECORD, f, indent=1, sort_keys=True, default=str)
    failed = [name for name, figures in RECORD["checks"].items() if "EXCEPTION" in figures]
    print(f"[audit] done; {len(failed)} check(s) raised: {failed}; record in {args.out}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
