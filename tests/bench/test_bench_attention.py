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


def test_bench_attention_defaults_cover_2k_to_16k_tokens():
    import argparse

    from mindspeed_vita.bench.attention import _naive_estimate_bytes, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert [int(x) for x in args.seq_lens.split(",")] == [2048, 4096, 8192, 16384]
    # on CPU (fp32) the 16K naive baseline exceeds the default budget and is skipped;
    # in bf16 (accelerators) it fits
    assert _naive_estimate_bytes(16384, args.heads, 4, True) > args.naive_max_gb * 2**30
    assert _naive_estimate_bytes(16384, args.heads, 2, True) < args.naive_max_gb * 2**30
    assert _naive_estimate_bytes(8192, args.heads, 4, True) < args.naive_max_gb * 2**30


def test_bench_attention_takes_the_cuda_kernel_option_on_any_backend(capsys):
    # backend options of other backends are ignored, so the same command runs everywhere
    assert main(["bench", "attention", "--seq-lens", "128", "--repeats", "1", "--json",
                 "--forward-only", "--backend", "cpu", "--attention-impl", "torch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "cpu" and "attention_kernels" not in out
