"""`bench attention` prints both implementations and their ratios, measured in one run."""
import json

import torch

from mindspeed_vita.cli import main


def test_bench_attention_json(capsys):
    # NOTE: at 256 tokens the naive scores (~0.5 MiB) could be served from pages the process
    # already held, so its measured RSS growth was 0 once under load; from 1024 tokens the
    # [s, s] scores are megabytes of fresh pages
    assert main(["bench", "attention", "--seq-length", "1024,2048", "--repeats", "1", "--json",
                 "--backend", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["seq_len"] for r in out["results"]] == [1024, 2048]
    for r in out["results"]:
        assert r["speedup"] > 0 and r["memory_ratio"] > 0
        assert r["naive_peak_bytes"] > r["backend_peak_bytes"]  # the naive one keeps [s, s] scores


def test_bench_attention_table_and_skip(capsys):
    assert main(["bench", "attention", "--seq-length", "128,1024", "--repeats", "1",
                 "--naive-max-gb", "0.01", "--forward-only", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "time ratio naive/backend" in out and "memory ratio naive/backend" in out
    assert "skipped" in out  # 1024 tokens exceed the tiny naive budget


def test_bench_attention_defaults_cover_2k_to_16k_tokens():
    import argparse

    from mindspeed_vita.bench.attention import _naive_estimate_bytes
    from mindspeed_vita.commands.bench_attention import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert args.seq_length == [2048, 4096, 8192, 16384]
    # every default point, 16K included, runs the naive baseline within the default budget,
    # in fp32 (CPU) and bf16 (accelerators), so each prints its ratios
    for s in (2048, 4096, 8192, 16384):
        assert _naive_estimate_bytes(s, args.heads, 4, True) < args.naive_max_gb * 2**30


def test_naive_estimate_is_an_upper_bound_of_the_measured_peak():
    # the budget check skips only what would not fit: the estimate must not under-count
    from backends import get_backend
    from mindspeed_vita.bench.attention import _naive_estimate_bytes, _step, naive_attention
    from mindspeed_vita.bench.common import measure

    backend = get_backend("cpu")
    s, heads = 2048, 2
    q = torch.randn(1, s, heads, 64)
    kv = torch.randn(1, s, 1, 64)
    peak = measure(_step(naive_attention, q, kv, kv, True), backend, repeats=1)["peak_bytes"]
    estimate = _naive_estimate_bytes(s, heads, 4, True)
    assert heads * s * s * 4 * 2 < peak <= estimate, (peak, estimate)


def test_bench_attention_takes_the_cuda_kernel_option_on_any_backend(capsys):
    # backend options of other backends are ignored, so the same command runs everywhere
    assert main(["bench", "attention", "--seq-length", "128", "--repeats", "1", "--json",
                 "--forward-only", "--backend", "cpu", "--attention-impl", "torch"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "cpu" and "attention_kernels" not in out


def test_bench_attention_naive_out_of_memory_is_a_skipped_row(capsys, monkeypatch):
    # a device with less free memory than the budget assumed: the row says so, the run goes on
    import mindspeed_vita.bench.attention as bench

    real_measure = bench.measure

    def measure(fn, backend, repeats):
        if measure.calls:  # the backend is measured first, the naive baseline second
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 60.00 GiB")
        measure.calls += 1
        return real_measure(fn, backend, repeats=repeats)
    measure.calls = 0
    monkeypatch.setattr(bench, "measure", measure)
    assert main(["bench", "attention", "--seq-length", "128", "--repeats", "1",
                 "--forward-only", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "out of memory" in out
