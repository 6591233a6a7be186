"""`mindspeed-vita bench lm-head`: full vs chunked vs logits-masked LM head, forward + backward.

For each sequence length the three heads run on the same hidden states, output-layer weight and
labels (a fraction `--label-fraction` of the rows supervised, in contiguous answer spans), at
TP = 1 in this process. The table prints time and peak memory of each head and the ratios
against the full head measured in the same run, plus each head's loss relative to the full
head's (they compute the same value).

Then the longest sequence each head handles within `--memory-budget-gb` is derived
ANALYTICALLY from the measurements: per head, a least-squares line `bytes = fixed + per_token *
tokens` through the measured totals (peak growth of the call + the inputs it needs: weight,
hidden, labels), solved for the budget. The head alone is modelled (no decoder activations).

Sizes: the defaults are the representative ones (8K and 32K tokens, Qwen2.5 vocabulary
152,064) with a small hidden size (256), since the cost of every head grows with tokens x
vocabulary; set `--hidden 5120` (Qwen2.5-14B) on a device. A head whose estimated peak exceeds
`--max-estimate-gb` is skipped and its estimate printed (on a small CPU host the full head at
32K tokens needs ~20 GB in fp32). Quick CPU run: `--seq-length 1024,4096`.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from mindspeed_vita.bench.common import format_bytes, format_table, measure, print_json
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.models.lm_head import (
    IGNORE_INDEX, HEAD_NAMES, LMHead, LogitsMaskedHead, build_lm_head)


# ------------------------------------------------------------------------------ inputs
def supervised_mask(tokens: int, fraction: float, span_tokens: int) -> torch.Tensor:
    """Bool `[tokens]`: about `fraction` of the rows, as `k` equal segments each ending in one
    supervised span (a prompt followed by its answer)."""
    wanted = round(tokens * fraction)
    mask = torch.zeros(tokens, dtype=torch.bool)
    if wanted == 0:
        return mask
    spans = max(1, round(wanted / span_tokens))
    bounds = [round(i * tokens / spans) for i in range(spans + 1)]
    per_span = [round((i + 1) * wanted / spans) - round(i * wanted / spans) for i in range(spans)]
    for stop, length in zip(bounds[1:], per_span):
        mask[stop - length:stop] = True
    return mask


def _estimate_peak_bytes(head: LMHead, tokens: int, supervised: int, args, elem: int) -> int:
    """Rough peak growth of one forward + backward (used only to skip impossible points):
    projected rows x vocab x (fp32 logits/softmax + compute-dtype logits and their gradient)
    + weight gradient (+ fp32 accumulator when chunked) + hidden gradient."""
    rows = {"full": tokens, "chunked": min(args.chunk_size, tokens),
            "logits-masked": supervised}[head.name]
    per_logit = 4 + (2 * elem if elem < 4 else 0)
    weight_grad = args.vocab * args.hidden * (elem + (4 if head.name == "chunked" else 0))
    return rows * args.vocab * per_logit + weight_grad + 2 * tokens * args.hidden * elem


def _step(head: LMHead, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
          losses: Dict[str, float]):
    def run():
        hidden.grad = None
        weight.grad = None
        loss_sum, _ = head.loss(hidden, weight, labels)
        loss_sum.backward()
        losses[head.name] = float(loss_sum.detach())
    return run


# ----------------------------------------------------------------- longest sequence model
def fit_memory_line(points: Sequence[tuple]) -> Optional[Dict[str, float]]:
    """Least-squares `bytes = fixed + per_token * tokens` through `(tokens, bytes)` points;
    one point gives a line through the origin (no fixed part). None without points."""
    if not points:
        return None
    if len(points) == 1:
        tokens, total = points[0]
        return {"fixed_bytes": 0.0, "bytes_per_token": total / tokens, "fit": "proportional"}
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_b = sum(b for _, b in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (b - mean_b) for t, b in points) / var
    return {"fixed_bytes": mean_b - slope * mean_t, "bytes_per_token": slope,
            "fit": f"least squares, {n} points"}


def longest_within(line: Dict[str, float], budget_bytes: float) -> Optional[int]:
    """Most tokens whose modelled bytes fit the budget; None when the line does not grow with
    tokens (the head is not what limits the length in the measured range)."""
    if line["bytes_per_token"] <= 0:
        return None
    return max(0, int((budget_bytes - line["fixed_bytes"]) // line["bytes_per_token"]))


# --------------------------------------------------------------------------------- run
def _check_args(args) -> None:
    if not 0.0 < args.label_fraction <= 1.0:
        raise UserInputError(f"--label-fraction {args.label_fraction}: must be in (0, 1]")
    for flag, value in (("--vocab", args.vocab), ("--hidden", args.hidden),
                        ("--chunk-size", args.chunk_size), ("--span-tokens", args.span_tokens),
                        ("--repeats", args.repeats)):
        if value <= 0:
            raise UserInputError(f"{flag} {value}: must be positive")
    if args.warmup < 0:
        raise UserInputError(f"--warmup {args.warmup}: must be >= 0")


def run(args) -> int:
    """Run the benchmark; print a table (or one JSON object with `--json`)."""
    from megatron.core import parallel_state

    from backends import get_backend
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    _check_args(args)
    seq_lens = args.seq_length
    backend = get_backend(args.backend)
    dtype = getattr(torch, args.dtype) if args.dtype else backend.default_compute_dtype
    owns_parallel_state = not parallel_state.model_parallel_is_initialized()
    if owns_parallel_state:
        # the heads are measured in this one process: the one-process layout
        initialize_parallel(backend, ParallelLayout(), seed=1234)
    try:
        summary = _measure_all(args, backend, dtype, seq_lens)
    finally:
        if owns_parallel_state:
            destroy_parallel()
    if args.json:
        print_json(summary)
    else:
        _print_report(summary)
    return 0


def _measure_all(args, backend, dtype, seq_lens) -> dict:
    dev = backend.device()
    elem = torch.tensor([], dtype=dtype).element_size()
    heads = [build_lm_head(name, args.chunk_size) for name in HEAD_NAMES]
    # the logits-masked head as the paper measures it: selected rows in ONE projection (in the
    # model it also chunks them above lm_head_chunk_size; tests/models/test_lm_head.py)
    heads[HEAD_NAMES.index("logits-masked")] = LogitsMaskedHead()
    gen = torch.Generator().manual_seed(1234)
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * 0.02).to(dev, dtype)
    weight.requires_grad_()
    results, points = [], {h.name: [] for h in heads}
    for tokens in seq_lens:
        hidden = torch.randn(tokens, 1, args.hidden, generator=gen).to(dev, dtype)
        hidden.requires_grad_()
        mask = supervised_mask(tokens, args.label_fraction, args.span_tokens)
        labels = torch.randint(0, args.vocab, (1, tokens), generator=gen)
        labels[0, ~mask] = IGNORE_INDEX
        labels = labels.to(dev)
        supervised = int(mask.sum())
        input_bytes = (weight.numel() + hidden.numel()) * elem + labels.numel() * 8
        losses: Dict[str, float] = {}
        rows = {}
        for head in heads:
            row = {"seq_len": tokens, "head": head.name, "supervised_tokens": supervised}
            estimate = _estimate_peak_bytes(head, tokens, supervised, args, elem)
            if estimate > args.max_estimate_gb * 2**30:
                row["skipped_estimate_bytes"] = estimate
            else:
                m = measure(_step(head, hidden, weight, labels, losses), backend,
                            repeats=args.repeats, warmup=args.warmup)
                row.update(time_s=m["time_s"], peak_bytes=m["peak_bytes"])
                # NOTE: up to one chunk the chunked head IS the full head; its memory only
                # becomes linear in tokens (with a one-chunk fixed part) above the chunk size.
                if head.name != "chunked" or tokens > args.chunk_size:
                    points[head.name].append((tokens, m["peak_bytes"] + input_bytes))
            rows[head.name] = row
        full = rows["full"]
        for head in heads:
            row = rows[head.name]
            if "time_s" in row and "time_s" in full:
                row["time_vs_full"] = row["time_s"] / max(full["time_s"], 1e-12)
                row["peak_vs_full"] = row["peak_bytes"] / max(full["peak_bytes"], 1)
            if head.name in losses and "full" in losses:
                row["loss_rel_diff_vs_full"] = (abs(losses[head.name] - losses["full"])
                                                / max(abs(losses["full"]), 1e-30))
            results.append(row)
        del hidden, labels
    budget = args.memory_budget_gb * 2**30
    longest = {}
    for head in heads:
        line = fit_memory_line(points[head.name])
        if line is None:
            line = {"fit": "no usable measurement" + (
                f" (needs a sequence length above the chunk size {args.chunk_size})"
                if head.name == "chunked" else "")}
            longest[head.name] = dict(line, max_tokens=None)
        else:
            longest[head.name] = dict(line, max_tokens=longest_within(line, budget))
    full_max = longest["full"]["max_tokens"]
    ratios = {}
    for name in ("logits-masked", "chunked"):
        other = longest[name]["max_tokens"]
        ratios[name] = (other / full_max) if (other is not None and full_max) else None
    return {
        "backend": backend.name, "dtype": str(dtype).removeprefix("torch."),
        "vocab": args.vocab, "hidden": args.hidden, "label_fraction": args.label_fraction,
        "chunk_size": args.chunk_size, "pass": "forward+backward", "tensor_parallel": 1,
        "results": results,
        "memory_budget": {
            "budget_bytes": int(budget),
            "method": "analytic: least-squares line of measured peak growth + input bytes vs "
                      "tokens, per head, solved for the budget (head alone, no decoder)",
            "heads": longest,
            "longest_masked_over_full": ratios["logits-masked"],
            "longest_chunked_over_full": ratios["chunked"],
        },
    }


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_report(summary: dict) -> None:
    print(f"lm head on backend {summary['backend']} ({summary['dtype']}, {summary['pass']}, "
          f"vocab {summary['vocab']}, hidden {summary['hidden']}, "
          f"{summary['label_fraction']:.0%} of rows supervised, chunk {summary['chunk_size']}, "
          f"TP 1)")
    rows = []
    for r in summary["results"]:
        if "time_s" in r:
            measured = (f"{r['time_s']:.4f}", format_bytes(r["peak_bytes"]),
                        _ratio(r.get("time_vs_full")), _ratio(r.get("peak_vs_full")),
                        f"{r['loss_rel_diff_vs_full']:.1e}" if "loss_rel_diff_vs_full" in r
                        else "-")
        else:
            measured = ("skipped", f"~{format_bytes(r['skipped_estimate_bytes'])}", "-", "-",
                        "-")
        rows.append((r["seq_len"], r["head"], r["supervised_tokens"]) + measured)
    print(format_table(["tokens", "head", "supervised", "time s", "peak", "time vs full",
                        "peak vs full", "loss rel diff"], rows))
    mb = summary["memory_budget"]
    print(f"\nlongest sequence within {format_bytes(mb['budget_bytes'])} ({mb['method']}):")
    rows = []
    for name, info in mb["heads"].items():
        if "bytes_per_token" not in info:
            rows.append((name, "-", "-", info["fit"]))
            continue
        tokens = info["max_tokens"]
        rows.append((name, format_bytes(info["bytes_per_token"]),
                     format_bytes(info["fixed_bytes"]),
                     "not bounded by the head" if tokens is None else f"{tokens:,}"))
    print(format_table(["head", "bytes/token", "fixed", "max tokens"], rows))
    print(f"longest masked / longest full: {_ratio(mb['longest_masked_over_full'])}; "
          f"longest chunked / longest full: {_ratio(mb['longest_chunked_over_full'])}")
