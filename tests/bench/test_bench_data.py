"""`bench data`: the real pipeline's throughput and packing utilisation, with the pad-to-longest
and next-fit baselines measured on the same samples."""
import json
import os

import pytest

from mindspeed_vita.bench.data import pad_to_longest_utilisation, simulated_packing_utilisation
from mindspeed_vita.cli import main
from mindspeed_vita.data.synth import write_synthetic_dataset
from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = os.path.join(REPO, "configs", "model", "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("synth")), seed=0, n_single=8, n_comic=3,
                                   n_video=4, n_text=6)


def test_pad_to_longest_utilisation_by_hand():
    # batches [2, 4] -> 6 / 8 and [3, 1] -> 4 / 6; a last, smaller batch pads to its own size
    assert pad_to_longest_utilisation([2, 4, 3, 1], 2) == pytest.approx(10 / 14)
    assert pad_to_longest_utilisation([2, 4, 3], 2) == pytest.approx(9 / 11)
    assert pad_to_longest_utilisation([5, 5, 5], 3) == 1.0
    assert pad_to_longest_utilisation([], 4) == 0.0
    with pytest.raises(ValueError, match="batch_size"):
        pad_to_longest_utilisation([1], 0)


def test_simulated_packing_by_hand():
    # next-fit, rows of 10: [6] closes when the second 6 does not fit, then [6, 4] fills a row;
    # the last 4 stays in the open row, which is not counted (no end-of-stream flush)
    next_fit = simulated_packing_utilisation([6, 6, 4, 4], seq_length=10, mode="reset", lookahead=1)
    assert next_fit == pytest.approx(16 / 20)
    # lookahead 2 puts a 4 next to the first 6: one full row
    assert simulated_packing_utilisation([6, 6, 4, 4], seq_length=10, mode="reset", lookahead=2) == 1.0


def test_bench_data_json_reports_rates_and_ratios(capsys, small_synth, tokenizer_dir):
    assert main(["bench", "data", "--data", small_synth["root"], "--model-config", TINY_MODEL,
                 "--tokenizer", tokenizer_dir, "--seq-length", "2048", "--samples", "40", "--batch-size", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"records", "rejected", "rows", "elapsed_s", "records_per_s", "tokens_per_s", "rows_per_s", "real_tokens",
            "rendered_tokens", "visual_units", "utilisation", "utilisation_vs_pad_to_longest", "seq_length",
            "packing", "lookahead", "batch_size", "workers", "stage", "image_size", "tokens_per_tile"} <= set(out)
    assert out["records"] >= 40 and out["rejected"] == {} and out["rows"] >= 1
    assert (out["seq_length"], out["packing"], out["stage"], out["image_size"]) == (2048, "reset", 2, 56)
    assert out["records_per_s"] == pytest.approx(out["records"] / out["elapsed_s"])
    assert out["tokens_per_s"] == pytest.approx(out["real_tokens"] / out["elapsed_s"])
    assert out["real_tokens"] <= out["rendered_tokens"]
    assert out["visual_units"] > 0  # pixels were rendered, not just counted
    utilisation, ratios = out["utilisation"], out["utilisation_vs_pad_to_longest"]
    assert set(utilisation) == {"packer", "next_fit", "pad_to_longest"}
    assert all(0 < value <= 1 for value in utilisation.values())
    for name in ("packer", "next_fit"):
        assert ratios[name] == pytest.approx(utilisation[name] / utilisation["pad_to_longest"])
    assert utilisation["packer"] > utilisation["pad_to_longest"]


def test_bench_data_at_16k_packs_the_synthetic_mixture_above_95_percent(capsys, tokenizer_dir):
    # the default synthetic dataset, written by the command into a temporary directory
    assert main(["bench", "data", "--model-config", TINY_MODEL, "--tokenizer", tokenizer_dir, "--samples", "300"]) == 0
    text = capsys.readouterr().out
    for phrase in ("samples/s", "tokens/s", "vs pad-to-longest", "packer (lookahead 16)",
                   "next-fit packer (lookahead 1)", "pad-to-longest (batch 8)"):
        assert phrase in text, phrase
    packer_line = next(line for line in text.splitlines() if "packer (lookahead 16)" in line)
    utilisation, ratio = packer_line.split()[-2:]
    assert float(utilisation.rstrip("%")) >= 95.0
    assert float(ratio.rstrip("x")) > 1.0


def test_bench_data_rejects_bad_flags(capsys, tmp_path):
    assert main(["bench", "data", "--samples", "0"]) == 2
    assert "argument --samples: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["bench", "data", "--data", str(tmp_path)]) == 2
    assert "stage2.yaml: no such mixture" in capsys.readouterr().err
