"""`bench decode` runs both decode modes in its CP processes at a tiny size and reports them."""
import json

from mindspeed_vita.cli import main


def test_bench_decode_json_tiny(capsys):
    assert main(["bench", "decode", "--contexts", "48,200", "--cp", "2", "--new-tokens", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cp"] == 2 and [r["context"] for r in out["results"]] == [48, 200]
    for row in out["results"]:
        for mode in ("kv-cache", "fixed-length"):
            assert row[mode]["tokens_per_s"] > 0 and len(row[mode]["tokens"]) == 3
        # both modes decode the same greedy tokens; the ratio is the one printed
        assert row["same_tokens"] is True
        assert row["speedup"] == row["kv-cache"]["tokens_per_s"] / \
            row["fixed-length"]["tokens_per_s"]


def test_bench_decode_refuses_cp1(capsys):
    assert main(["bench", "decode", "--cp", "1"]) != 0
    assert "--cp 1" in capsys.readouterr().err
