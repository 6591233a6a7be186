"""`mindspeed-vita bench prefill`: memory of the context-parallel prefill, on the tiny model.

Two measurements, each in its own gloo processes on the CPU (fp32, text prompt of random
tokens, the engine's KV-cache prefill: `inference.decoding.CachedDecoding.prefill`, which runs
ring attention under CP, fills the (sharded) KV cache and projects the predicting row):

* peak memory growth per rank at CP 1, 2, 4 for one total prompt length (`--seq-length`): the
  activations and the cache shard should fall close to 1/CP;
* at CP 1, for each LM head (full, chunked, logits-masked), the longest prompt of `--lengths`
  whose prefill stays within `--budget-mib` of peak growth: the full head materialises the
  logits of every prompt row, the chunked head one chunk of them, the logits-masked head only
  the predicting row's.

Peak memory on CPU is the growth of the process's peak resident set (`backends.cpu`).
"""
from __future__ import annotations

from typing import Dict, List

from mindspeed_vita.bench.common import format_bytes, format_table, measure, print_json
from mindspeed_vita.bench.decode import tiny_groups, tiny_model
from mindspeed_vita.bench.spawn import run_group
from mindspeed_vita.errors import UserInputError

HEADS = ("full", "chunked", "logits-masked")


def _prefill_peak(model, length: int, repeats: int) -> int:
    import torch

    from mindspeed_vita.inference.decoding import CachedDecoding

    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(0, 900, (1, length), generator=gen)

    def prefill():
        with torch.no_grad():
            CachedDecoding(model, ids, None, 1).prefill()

    return measure(prefill, model.backend, repeats=repeats)["peak_bytes"]


def _cp_body(rank: int, world: int, cfg: Dict) -> Dict:
    from mindspeed_vita.parallel.process_groups import destroy_parallel

    model = tiny_model(tiny_groups(world), lm_head="logits-masked")
    try:
        return {"rank": rank, "peak_bytes": _prefill_peak(model, cfg["seq_length"],
                                                          cfg["repeats"])}
    finally:
        destroy_parallel()


def _head_body(rank: int, world: int, cfg: Dict) -> Dict:
    from mindspeed_vita.parallel.process_groups import destroy_parallel

    groups = tiny_groups(1)
    result: Dict[str, List[Dict]] = {}
    try:
        for head in HEADS:
            model = tiny_model(groups, lm_head=head)
            peaks = result[head] = []
            for length in cfg["lengths"]:
                peak = _prefill_peak(model, length, cfg["repeats"])
                peaks.append({"length": length, "peak_bytes": peak})
                if peak > cfg["budget_bytes"]:
                    break  # longer prompts only need more
            del model
    finally:
        destroy_parallel()
    return result


def run(args) -> int:
    """Run both measurements and print their tables (or one JSON object)."""
    cp_sizes = sorted(set([1] + list(args.cp_sizes)))
    for cp in cp_sizes:
        if args.seq_length % (2 * cp):
            raise UserInputError(f"--seq-length {args.seq_length} is not a multiple of "
                                 f"2 * cp = {2 * cp} (zigzag cuts it into 2 * cp chunks)")
    lengths = sorted(set(args.lengths))
    budget = int(args.budget_mib * 2 ** 20)
    cp_rows = []
    for cp in cp_sizes:
        ranks = run_group(_cp_body, cp, {"seq_length": args.seq_length, "repeats": args.repeats},
                          timeout=args.timeout, name=f"bench prefill (CP {cp})")
        cp_rows.append({"cp": cp, "peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                        "peak_bytes_max_rank": max(r["peak_bytes"] for r in ranks)})
    base = cp_rows[0]["peak_bytes_max_rank"]
    for row in cp_rows:
        row["peak_ratio_vs_cp1"] = row["peak_bytes_max_rank"] / base if base else None
    per_head = run_group(_head_body, 1, {"lengths": lengths, "budget_bytes": budget,
                                         "repeats": args.repeats},
                         timeout=args.timeout, name="bench prefill (heads)")[0]
    head_rows = []
    for head in HEADS:
        fits = [p["length"] for p in per_head[head] if p["peak_bytes"] <= budget]
        head_rows.append({"head": head, "longest_prompt": max(fits) if fits else 0,
                          "peaks": per_head[head]})
    summary = {"seq_length": args.seq_length, "budget_bytes": budget, "lengths": lengths,
               "model": "configs/model/tiny.yaml", "backend": "cpu", "dtype": "float32",
               "cp": cp_rows, "heads": head_rows}
    if args.json:
        print_json(summary)
        return 0
    print(f"prefill on CPU gloo processes, tiny model (float32), {args.seq_length} tokens, "
          f"logits-masked head: peak memory growth per rank")
    print(format_table(
        ["CP", "tokens/rank", "peak/rank (max)", "vs CP1", "ideal 1/CP"],
        [(r["cp"], args.seq_length // r["cp"], format_bytes(r["peak_bytes_max_rank"]),
          f"{r['peak_ratio_vs_cp1']:.2f}" if r["peak_ratio_vs_cp1"] else "-", f"{1 / r['cp']:.2f}")
         for r in cp_rows]))
    print()
    print(f"longest prompt (of {', '.join(map(str, lengths))}) prefilled at CP 1 within "
          f"{format_bytes(budget)} of peak growth")
    print(format_table(
        ["head", "longest prompt", "peak at each length"],
        [(r["head"], r["longest_prompt"],
          ", ".join(f"{p['length']}: {format_bytes(p['peak_bytes'])}" for p in r["peaks"]))
         for r in head_rows]))
    return 0
