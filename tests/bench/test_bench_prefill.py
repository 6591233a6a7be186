"""`bench prefill` reports per-rank prefill memory per CP size and, per LM head, the longest
prompt within a budget, at a tiny size."""
import json

from mindspeed_vita.cli import main


def test_bench_prefill_json_tiny(capsys):
    assert main(["bench", "prefill", "--seq-length", "512", "--cp-sizes", "2",
                 "--lengths", "256,4096", "--budget-mib", "6", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cps = {r["cp"]: r for r in out["cp"]}
    assert sorted(cps) == [1, 2] and len(cps[2]["peak_bytes_per_rank"]) == 2
    assert cps[1]["peak_ratio_vs_cp1"] == 1.0
    heads = {r["head"]: r for r in out["heads"]}
    assert sorted(heads) == ["chunked", "full", "logits-masked"]
    for row in heads.values():
        fits = [p["length"] for p in row["peaks"] if p["peak_bytes"] <= out["budget_bytes"]]
        assert row["longest_prompt"] == (max(fits) if fits else 0)
    # 4096 rows of full logits (16 MiB in fp32) cannot fit in 6 MiB; one row always can
    assert heads["full"]["longest_prompt"] < 4096


def test_bench_prefill_refuses_lengths_zigzag_cannot_split(capsys):
    assert main(["bench", "prefill", "--seq-length", "100", "--cp-sizes", "4"]) != 0
    assert "--seq-length 100 is not a multiple of 2 * cp = 8" in capsys.readouterr().err
