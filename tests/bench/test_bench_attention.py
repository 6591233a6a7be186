"""`bench attention` prints both implementations and their ratios, measured in one run."""
import json

from mindspeed_vita.cli import main


def test_bench_attention_json(capsys):
    assert main(["bench", "attention", "--seq-lens", "256,512", "--repeats", "1", "--json",
                 "--backend", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seq_len"] for r in out["results"]] == [256, 512]
    for r in out["results"]:
        assert r["speedup"] > 0 and r["memory_ratio"] > 0
        assert r["naive_peak_bytes"] > r["backend_peak_bytes"]  # the naive one keeps [s, s] scores


def test_bench_attention_table_and_skip(capsys):
    assert main(["bench", "attention", "--seq-lens", "128,1024", "--repeats", "1",
                 "--naive-max-gb", "0.01", "--forward-only", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "time ratio naive/backend" in out and "memory ratio naive/backend" in out
    assert "skipped" in out  # 1024 tokens exceed the tiny naive budget
