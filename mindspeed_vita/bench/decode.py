"""`mindspeed-vita bench decode`: tokens/s of KV-cache context-parallel decoding against the
paper's fixed-length decoding (a full forward of the padded sequence per token), on the tiny
model, at several context lengths, in one run.

Both modes run in the same CP processes (gloo on the CPU, fp32, greedy, text only) through the
engine's decoding strategies (`inference.decoding`): the prompt of `context` random tokens is
prefilled (KV cache: ring attention into the sharded cache; fixed length: the first full
forward), then `--new-tokens` tokens are decoded and timed. KV-cache decoding costs one row per
step against the cache, the fixed-length mode a forward of the whole padded sequence, so the
ratio should grow with the context. The two modes' greedy tokens are compared as well.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional

from mindspeed_vita.bench.common import format_table, print_json
from mindspeed_vita.bench.spawn import run_group
from mindspeed_vita.errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("kv-cache", "fixed-length")


def tiny_groups(cp: int, seed: int = 1):
    """The parallel groups of CP `cp` on the CPU backend (the world is this process group)."""
    from backends import get_backend
    from mindspeed_vita.config.schema import ParallelConfig
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return initialize_parallel(get_backend("cpu"), ParallelLayout.from_config(
        ParallelConfig(cp=cp), world), seed=seed)


def tiny_model(groups, lm_head: Optional[str] = None):
    """The tiny model (configs/model/tiny.yaml, fp32) on the CPU backend under `groups`, with
    the LM head `lm_head` (default: the config's)."""
    import yaml

    from backends import get_backend
    from mindspeed_vita.config.model import ModelConfig
    from mindspeed_vita.models.vlm import LongVitaModel

    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        raw = yaml.safe_load(f)
    if lm_head is not None:
        raw["lm_head"] = lm_head
    # no visual context id below the vocabulary: the prompts are random text tokens
    return LongVitaModel(ModelConfig.model_validate(raw), get_backend("cpu"), groups=groups,
                         context_token_ids=(raw["language"]["vocab_size"],)).eval()


def _time_mode(model, mode: str, ids, new_tokens: int) -> Dict:
    import torch.distributed as dist

    from mindspeed_vita.inference.decoding import make_decoding

    decoding = make_decoding(mode, model, ids, None, new_tokens + 1)
    dist.barrier()
    start = time.perf_counter()
    tokens = decoding.prefill().argmax(-1)
    dist.barrier()
    prefill_s = time.perf_counter() - start
    chosen = [int(tokens[0])]
    start = time.perf_counter()
    for i in range(new_tokens):
        tokens = decoding.step(tokens, ids.shape[1] + i).argmax(-1)
        chosen.append(int(tokens[0]))
    dist.barrier()
    seconds = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_s": seconds, "tokens_per_s": new_tokens / seconds,
            "tokens": chosen}


def _body(rank: int, world: int, cfg: Dict) -> List[Dict]:
    import torch

    from mindspeed_vita.parallel.process_groups import destroy_parallel

    model = tiny_model(tiny_groups(world))
    rows = []
    try:
        with torch.no_grad():
            for context in cfg["contexts"]:
                gen = torch.Generator().manual_seed(context)
                ids = torch.randint(0, 900, (1, context), generator=gen)
                row = {"context": context}
                for mode in MODES:
                    row[mode] = _time_mode(model, mode, ids, cfg["new_tokens"])
                rows.append(row)
    finally:
        destroy_parallel()
    return rows


def run(args) -> int:
    """Run the benchmark and print its table (or one JSON object)."""
    contexts = sorted(set(args.contexts))
    if args.cp < 2:
        raise UserInputError(f"--cp {args.cp}: the benchmark compares context-parallel decoding, "
                             f"use 2 or more")
    cfg = {"contexts": contexts, "new_tokens": args.new_tokens}
    ranks = run_group(_body, args.cp, cfg, timeout=args.timeout, name="bench decode")
    rows = []
    for i, context in enumerate(contexts):
        per_rank = [r[i] for r in ranks]
        row = {"context": context}
        for mode in MODES:
            # the slowest rank sets the pace of the group
            row[mode] = {"tokens_per_s": min(r[mode]["tokens_per_s"] for r in per_rank),
                         "prefill_s": max(r[mode]["prefill_s"] for r in per_rank),
                         "tokens": per_rank[0][mode]["tokens"]}
        row["speedup"] = row["kv-cache"]["tokens_per_s"] / row["fixed-length"]["tokens_per_s"]
        row["same_tokens"] = row["kv-cache"]["tokens"] == row["fixed-length"]["tokens"]
        rows.append(row)
    summary = {"cp": args.cp, "new_tokens": args.new_tokens, "model": "configs/model/tiny.yaml",
               "backend": "cpu", "dtype": "float32", "results": rows}
    if args.json:
        print_json(summary)
        return 0
    print(f"decode on CPU gloo processes, CP {args.cp}, tiny model (float32, greedy), "
          f"{args.new_tokens} timed tokens after the prefill")
    print(format_table(
        ["context", "kv-cache tok/s", "fixed-length tok/s", "kv-cache / fixed", "same tokens",
         "kv prefill s", "fixed first forward s"],
        [(r["context"], f"{r['kv-cache']['tokens_per_s']:.2f}",
          f"{r['fixed-length']['tokens_per_s']:.3f}", f"{r['speedup']:.1f}x", r["same_tokens"],
          f"{r['kv-cache']['prefill_s']:.2f}", f"{r['fixed-length']['prefill_s']:.2f}")
         for r in rows]))
    return 0
