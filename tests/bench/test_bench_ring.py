"""`bench ring` runs its CP process groups at a tiny size and reports every ratio it promises."""
import json

import torch

from mindspeed_vita.cli import main


def test_bench_ring_json_tiny(capsys):
    # 2048 tokens: at 256 the CP 1 step could reuse pages the process already held and its
    # measured peak growth was 0 once (no baseline, so no ratio)
    assert main(["bench", "ring", "--seq-length", "2048", "--cp-sizes", "2", "--heads", "2",
                 "--kv-heads", "1", "--head-dim", "16", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["cp"]: r for r in out["results"]}
    assert sorted(rows) == [1, 2]  # CP 1 is always run: it is the memory baseline
    assert rows[1]["peak_ratio_vs_cp1"] == 1.0 and rows[2]["tokens_per_rank"] == 1024
    ring = rows[2]
    assert len(ring["per_rank"]) == 2
    for key in ("zigzag_imbalance", "contiguous_imbalance"):
        assert ring[key] >= 1.0
    for key in ("compute_s", "comm_s", "ring_s"):
        assert ring[key] > 0
    assert 0.0 <= ring["hidden_fraction"] <= 1.0
    assert ring["peak_bytes_max_rank"] >= 0


def test_bench_ring_refuses_lengths_zigzag_cannot_split(capsys):
    assert main(["bench", "ring", "--seq-length", "100", "--cp-sizes", "1,4"]) != 0
    assert "--seq-length 100 is not a multiple of 2 * cp = 8" in capsys.readouterr().err


def test_contiguous_baseline_does_one_full_block_per_earlier_rank():
    # the baseline's work grows with the rank: rank 2 repeats rank 0's diagonal plus two
    # unmasked blocks (checked through dq of a ones gradient against the same sums by hand)
    from backends.cpu import CPUBackend
    from mindspeed_vita.bench.ring import _contiguous_step

    backend = CPUBackend()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=gen) for _ in range(3))
    assert _contiguous_step(backend, q, k, v, 0).shape == q.shape
    # rank 1 = attention over [causal own block, full copy of it]: equals causal-free
    # attention over the doubled key set with the own block masked causally
    keys = torch.cat([k, k], dim=1)
    values = torch.cat([v, v], dim=1)
    qq = q.clone().requires_grad_()
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[:, :8] = torch.ones(8, 8, dtype=torch.bool).tril()
    scores = torch.einsum("bqhd,bkhd->bhqk", qq, keys) / 2.0
    out = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~mask, float("-inf")).softmax(-1),
                       values)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(_contiguous_step(backend, q, k, v, 1), qq.grad, atol=1e-5, rtol=0)
