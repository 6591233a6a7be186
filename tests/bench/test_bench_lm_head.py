"""`bench lm-head`: the three heads, their ratios against the full head measured in the same run,
and the longest-sequence estimate within a memory budget."""
import json

import pytest

from mindspeed_vita.bench.lm_head import fit_memory_line, longest_within, supervised_mask
from mindspeed_vita.cli import main

TINY = ["--seq-length", "512,2048", "--vocab", "4096", "--hidden", "32", "--chunk-size", "512",
        "--repeats", "1", "--warmup", "0", "--backend", "cpu"]


def test_bench_lm_head_json(capsys):
    # two timed repeats: the peak is the smaller of two, robust to process-wide RSS noise
    args = [a if a != "1" or TINY[i - 1] != "--repeats" else "2" for i, a in enumerate(TINY)]
    assert main(["bench", "lm-head", *args, "--memory-budget-gb", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"backend", "dtype", "vocab", "hidden", "label_fraction", "chunk_size", "results",
            "memory_budget"} <= set(out)
    by_key = {(r["seq_len"], r["head"]): r for r in out["results"]}
    assert set(by_key) == {(s, h) for s in (512, 2048)
                           for h in ("full", "chunked", "logits-masked")}
    for r in out["results"]:
        assert r["time_s"] > 0 and r["time_vs_full"] > 0 and r["peak_vs_full"] > 0
        assert r["loss_rel_diff_vs_full"] < 1e-5  # all heads compute the same loss
        assert r["supervised_tokens"] == r["seq_len"] // 4
    # 2048 tokens x 4096 vocab: 32 MiB of fp32 logits for the full head, 8 for the masked one,
    # one 512-row chunk (8 MiB) for the chunked one.
    full_peak = by_key[(2048, "full")]["peak_bytes"]
    assert full_peak >= 0.9 * 32 * 2**20  # RSS pages: a few may already be resident
    assert by_key[(2048, "logits-masked")]["peak_bytes"] < 0.5 * full_peak
    assert by_key[(2048, "chunked")]["peak_bytes"] < 0.5 * full_peak

    budget = out["memory_budget"]
    assert budget["budget_bytes"] == 2**30 and budget["method"].startswith("analytic")
    for name in ("full", "chunked", "logits-masked"):
        info = budget["heads"][name]
        assert {"bytes_per_token", "fixed_bytes", "fit", "max_tokens"} <= set(info)
    # Only 2048 tokens exceed the 512-row chunk: the chunked fit uses that point alone.
    assert budget["heads"]["chunked"]["fit"] == "proportional"
    assert budget["heads"]["full"]["fit"] == "least squares, 2 points"
    assert budget["longest_masked_over_full"] > 2.0  # 25% supervised rows: about 4x
    assert budget["longest_chunked_over_full"] > 1.0


def test_bench_lm_head_table_and_skip(capsys):
    assert main(["bench", "lm-head", *TINY, "--max-estimate-gb", "0.02"]) == 0
    out = capsys.readouterr().out
    for text in ("time vs full", "peak vs full", "loss rel diff", "longest masked / longest full:",
                 "longest chunked / longest full:", "bytes/token"):
        assert text in out
    assert "skipped" in out  # the full head at 2048 tokens (~32 MiB) exceeds 0.02 GB


def test_bench_lm_head_rejects_bad_flags(capsys):
    assert main(["bench", "lm-head", *TINY, "--label-fraction", "0"]) == 2
    assert "argument --label-fraction: must be > 0, got 0" in capsys.readouterr().err
    assert main(["bench", "lm-head", *TINY, "--label-fraction", "1.5"]) == 2
    assert "--label-fraction 1.5: must be in (0, 1]" in capsys.readouterr().err
    assert main(["bench", "lm-head", *TINY[2:], "--seq-length", "8k"]) == 2
    assert "argument --seq-length: expected comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("tokens,fraction,span", [(8192, 0.25, 512), (100, 0.3, 512),
                                                  (1000, 1.0, 7)])
def test_supervised_mask_fraction_and_spans(tokens, fraction, span):
    mask = supervised_mask(tokens, fraction, span)
    assert int(mask.sum()) == round(tokens * fraction)
    starts = int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])
    assert starts == (1 if fraction == 1.0 else max(1, round(tokens * fraction / span)))


def test_memory_line_and_longest():
    line = fit_memory_line([(1000, 5000.0), (2000, 7000.0), (4000, 11000.0)])
    assert line["fixed_bytes"] == pytest.approx(3000.0)
    assert line["bytes_per_token"] == pytest.approx(2.0)
    assert longest_within(line, 10_003_000) == 5_000_000
    assert fit_memory_line([(1000, 4000.0)])["bytes_per_token"] == 4.0
    assert fit_memory_line([]) is None
    flat = fit_memory_line([(1000, 5000.0), (2000, 5000.0)])
    assert longest_within(flat, 10_000) is None  # memory does not grow with tokens
