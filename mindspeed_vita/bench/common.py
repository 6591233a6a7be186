"""Measurement helpers shared by every benchmark: wall time with warmup + repeats, peak memory
through the backend, bytes saved for backward, and plain-text / JSON reporting.

Memory comes from the backend (`reset_peak_memory_stats` / `max_memory_allocated`): the
allocator's peak on an accelerator, the growth of the peak resident set on CPU. Times are
taken after `backend.synchronize()` so queued device work is counted.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
import weakref
from typing import Callable, Dict, List, Sequence

import torch

from backends.base import Backend


def measure(fn: Callable[[], object], backend: Backend, repeats: int = 3,
            warmup: int = 1) -> Dict[str, float]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed.

    Returns `{"time_s": median seconds per call, "time_min_s": fastest call,
    "peak_bytes": smallest peak-memory growth over the timed calls}` (every call does the same
    work, and on CPU the peak is process-wide RSS that other threads can only inflate), growth
    meaning above what was live when the call started (inputs and weights are not counted).
    Each timed call gets its own peak window, started after garbage collection so earlier
    calls' tensors are not counted.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    backend.synchronize()
    times: List[float] = []
    peaks: List[int] = []
    for _ in range(repeats):
        gc.collect()
        backend.synchronize()
        backend.reset_peak_memory_stats()
        # Right after a reset the peak equals what is live now (0 growth on CPU, the live
        # weights/inputs on an accelerator): subtract it so every backend reports growth.
        base = backend.max_memory_allocated()
        start = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - start)
        peaks.append(backend.max_memory_allocated() - base)
    return {"time_s": statistics.median(times), "time_min_s": min(times),
            "peak_bytes": int(max(0, min(peaks)))}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd holds for backward once `fn` has returned:
    the memory a training step keeps alive between forward and backward. `fn` must return
    what the caller would keep (e.g. the loss), so its graph stays alive while counting.
    Tensors saved by graphs that `fn` already freed (a per-chunk inner backward) are not
    counted; views of one storage count once."""
    packed: List[weakref.ref] = []

    def pack(tensor: torch.Tensor):
        packed.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        kept = fn()  # keeps the graph (and what it saved) alive until the count below
    gc.collect()
    storages: Dict[tuple, int] = {}
    for ref in packed:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[(storage.data_ptr(), tensor.device.type)] = storage.nbytes()
    del kept
    return sum(storages.values())


def format_bytes(n: float) -> str:
    """Human-readable bytes: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table with right-aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(obj: object) -> None:
    """Print one JSON object on one line (what `--json` promises)."""
    print(json.dumps(obj, sort_keys=True))


__all__ = ["measure", "saved_tensor_bytes", "format_bytes", "format_table", "print_json"]
