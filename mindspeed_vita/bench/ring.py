"""`mindspeed-vita bench ring`: zigzag ring attention in CP gloo processes on the CPU.

One causal GQA sequence of `--seq-length` tokens (joint mode, dense `[1, s, n, d]`) is split over
each CP size of `--cp-sizes`, which run as that many spawned processes; every number below is
forward + backward and is measured in this run:

* balance (CP > 1): each rank's attention compute for the zigzag split (`ring_forward` /
  `ring_backward` without transfers) and for a contiguous split (rank r holds the r-th P-th:
  its causal diagonal plus a full block for every earlier rank, nothing for later ones). Ranks
  take turns so they do not share the cores; the ratio max/min over ranks of the CPU time
  (robust to other load on the machine; wall times are printed too) is the imbalance (zigzag
  should be <= 1.15; contiguous grows like 2P-1).
* memory: each rank's peak memory growth during a ring step (inputs excluded); with the same
  total length it should fall close to 1/CP of the single-process peak.
* overlap (CP > 1): compute alone (no transfers), communication alone (the same transfers with
  a backend that computes nothing; only the fp32 merges remain) and the real ring, all ranks
  at once, slowest rank, alternating within each round; hidden = (compute + comm - ring) /
  comm, clipped to [0, 1]. On a machine with fewer free cores than CP processes (or other
  load) this share is dominated by scheduling noise; read it on an otherwise idle host.

The workers use the CPU backend with one thread each (so CP processes do not oversubscribe
the cores); accelerators need their own launcher (torchrun) and are not covered here.
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from mindspeed_vita.bench.common import format_bytes, format_table, measure, print_json
from mindspeed_vita.bench.spawn import run_group
from mindspeed_vita.errors import UserInputError


# --------------------------------------------------------------------- worker side
class _NoCompute:
    """A backend stand-in that returns correctly shaped zeros at once: running the ring over it
    leaves only the transfers (and the cheap fp32 merges) - communication alone."""

    @staticmethod
    def attention_forward(q, k, v, params):
        lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else (q.shape[0], q.shape[2],
                                                                   q.shape[1])
        return q.new_zeros(q.shape), torch.zeros(lse_shape, dtype=torch.float32)

    @staticmethod
    def attention_backward(dout, q, k, v, out, lse, params):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _contiguous_step(backend, q, k, v, rank: int):
    """Attention compute of rank `rank` under a contiguous split, without transfers (its own
    kv stands in for the earlier ranks' blocks, which have the same shape): the causal
    diagonal, then one unmasked full block per earlier rank; backward under the merged stats."""
    from backends.attention_params import AttentionParams
    from mindspeed_vita.parallel.ring_attention import merge_partial

    causal, full = AttentionParams.dense("causal"), AttentionParams.dense("none")
    out, lse = backend.attention_forward(q, k, v, causal)
    out = out.float()
    for _ in range(rank):
        out, lse = merge_partial(out, lse, *backend.attention_forward(q, k, v, full), packed=False)
    out = out.to(q.dtype)
    dout = torch.ones_like(out)
    dq = backend.attention_backward(dout, q, k, v, out, lse, causal)[0].float()
    for _ in range(rank):
        dq += backend.attention_backward(dout, q, k, v, out, lse, full)[0]
    return dq


def _zigzag_step(backend, q, k, v, params, ring, communicate: bool = True):
    from mindspeed_vita.parallel.ring_attention import ring_backward, ring_forward

    out, lse = ring_forward(q, k, v, params, backend, ring, communicate=communicate)
    return ring_backward(torch.ones_like(out), q, k, v, out, lse, params, backend, ring,
                         communicate=communicate)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _lockstep_seconds(fns: Dict[str, object], repeats: int) -> Dict[str, float]:
    """Per function, the fastest over rounds of the slowest rank's time, all ranks starting
    together. The functions alternate within every round, so a burst of outside load hits
    them alike; the fastest, because on a shared machine interference only adds time."""
    import torch.distributed as dist

    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warmup
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            elapsed = torch.tensor([_seconds(fn)], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            best[name] = min(best[name], float(elapsed))
    return best


def _turns_seconds(fns: Dict[str, object], rank: int, cp: int, repeats: int) -> Dict[str, float]:
    """Each rank times `fns` alone while the others wait, round-robin over `repeats` rounds;
    per function the fastest round's wall time (`<name>`) and CPU time of this process
    (`<name>_cpu`). CPU time counts only the cycles this rank ran, so it measures the rank's
    work even on a machine that other processes load; the ratios are taken from it."""
    import torch.distributed as dist

    best = {}
    for fn in fns.values():
        fn()  # warmup, all ranks at once
    for _ in range(repeats):
        for turn in range(cp):
            dist.barrier()
            if turn != rank:
                continue
            for name, fn in fns.items():
                cpu_start = time.process_time()
                wall = _seconds(fn)
                cpu = time.process_time() - cpu_start
                best[name] = min(best.get(name, wall), wall)
                best[name + "_cpu"] = min(best.get(name + "_cpu", cpu), cpu)
    dist.barrier()
    return best


def _worker_body(rank: int, cp: int, cfg: Dict) -> Dict:
    import torch.distributed as dist

    from backends.cpu import CPUBackend
    from mindspeed_vita.parallel.ring_attention import RingAttentionParams, RingGroup
    from mindspeed_vita.parallel.zigzag import ZigzagShard

    backend = CPUBackend()
    ring = RingGroup.of(None)
    s, d = cfg["seq_len"], cfg["head_dim"]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(1, s, n, d, generator=gen) for n in (cfg["heads"], cfg["kv_heads"],
                                                              cfg["kv_heads"])]
    plan = ZigzagShard.build(1, s, cp, rank)
    q, k, v = (plan.shard(x) for x in full)
    del full
    params = RingAttentionParams.dense()
    repeats = cfg["repeats"]

    def ring_step():
        return _zigzag_step(backend, q, k, v, params, ring)

    # the peak is the same every call: two calls (after a warmup) are enough
    result = {"rank": rank,
              "peak_bytes": measure(ring_step, backend, repeats=min(repeats, 2))["peak_bytes"]}
    dist.barrier()
    if cp == 1:
        return result
    # balance: one rank at a time, so every rank has the cores to itself; a contiguous split
    # gives every rank s/cp tokens too (same shapes, other schedule)
    times = _turns_seconds({
        "zigzag_s": lambda: _zigzag_step(backend, q, k, v, params, ring, communicate=False),
        "contiguous_s": lambda: _contiguous_step(backend, q, k, v, rank)}, rank, cp, repeats)
    result.update(times)
    result.update(_lockstep_seconds({
        "compute_s": lambda: _zigzag_step(backend, q, k, v, params, ring, communicate=False),
        "comm_s": lambda: _zigzag_step(_NoCompute(), q, k, v, params, ring),
        "ring_s": ring_step}, repeats))
    return result


def _body(rank: int, cp: int, cfg: Dict) -> Dict:
    """`_worker_body` inside a gloo world that `bench.spawn.run_group` has set up the
    environment for (RANK / WORLD_SIZE / MASTER_*): the ring needs a plain default group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=cp)
    try:
        return _worker_body(rank, cp, cfg)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------- driver side
def _summarise(cp: int, ranks: List[Dict], base_peak: int) -> Dict:
    peak = max(r["peak_bytes"] for r in ranks)
    row = {"cp": cp, "tokens_per_rank": None, "peak_bytes_max_rank": peak,
           "peak_ratio_vs_cp1": peak / base_peak if base_peak else None,
           "per_rank": ranks}
    if cp > 1:
        zig = [r["zigzag_s_cpu"] for r in ranks]
        cont = [r["contiguous_s_cpu"] for r in ranks]
        comp = max(r["compute_s"] for r in ranks)
        comm = max(r["comm_s"] for r in ranks)
        both = max(r["ring_s"] for r in ranks)
        row.update(zigzag_imbalance=max(zig) / min(zig), contiguous_imbalance=max(cont) / min(cont),
                   compute_s=comp, comm_s=comm, ring_s=both,
                   hidden_fraction=min(1.0, max(0.0, (comp + comm - both) / comm)) if comm else 1.0)
    return row


def run(args) -> int:
    cp_sizes = sorted(set(args.cp_sizes))
    if 1 not in cp_sizes:
        cp_sizes.insert(0, 1)  # the memory baseline
    for cp in cp_sizes:
        if args.seq_length % (2 * cp):
            raise UserInputError(f"--seq-length {args.seq_length} is not a multiple of "
                                 f"2 * cp = {2 * cp} (zigzag cuts it into 2 * cp chunks)")
    if args.heads % args.kv_heads:
        raise UserInputError(f"--heads {args.heads} is not a multiple of --kv-heads "
                             f"{args.kv_heads}")
    cfg = dict(seq_len=args.seq_length, heads=args.heads, kv_heads=args.kv_heads,
               head_dim=args.head_dim, repeats=args.repeats)
    rows, base_peak = [], 0
    for cp in cp_sizes:
        ranks = run_group(_body, cp, cfg, timeout=args.timeout, name=f"bench ring (CP {cp})")
        if cp == 1:
            base_peak = ranks[0]["peak_bytes"]
        row = _summarise(cp, ranks, base_peak)
        row["tokens_per_rank"] = args.seq_length // cp
        rows.append(row)
    summary = dict(cfg, backend="cpu", dtype="float32", results=rows)
    summary["pass"] = "forward+backward"
    if args.json:
        print_json(summary)
        return 0
    print(f"ring attention on CPU gloo processes (float32, forward+backward, causal, "
          f"{args.seq_length} tokens, {args.heads} q heads / {args.kv_heads} kv heads, "
          f"head dim {args.head_dim})")
    print(format_table(
        ["CP", "tokens/rank", "peak/rank", "peak vs CP1", "ideal 1/CP"],
        [(r["cp"], r["tokens_per_rank"], format_bytes(r["peak_bytes_max_rank"]),
          f"{r['peak_ratio_vs_cp1']:.2f}" if r["peak_ratio_vs_cp1"] else "-",
          f"{1 / r['cp']:.2f}") for r in rows]))
    ring_rows = [r for r in rows if r["cp"] > 1]
    if ring_rows:
        print()
        print(format_table(
            ["CP", "zigzag max/min", "contiguous max/min", "compute s", "comm s", "ring s",
             "ring/compute", "comm hidden"],
            [(r["cp"], f"{r['zigzag_imbalance']:.3f}", f"{r['contiguous_imbalance']:.3f}",
              f"{r['compute_s']:.4f}", f"{r['comm_s']:.4f}", f"{r['ring_s']:.4f}",
              f"{r['ring_s'] / r['compute_s']:.3f}", f"{100 * r['hidden_fraction']:.0f}%")
             for r in ring_rows]))
        print()
        print(format_table(
            ["CP", "rank", "zigzag cpu s", "contiguous cpu s", "zigzag wall s",
             "contiguous wall s"],
            [(r["cp"], x["rank"], f"{x['zigzag_s_cpu']:.4f}", f"{x['contiguous_s_cpu']:.4f}",
              f"{x['zigzag_s']:.4f}", f"{x['contiguous_s']:.4f}")
             for r in ring_rows for x in r["per_rank"]]))
    return 0
