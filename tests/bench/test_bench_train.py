"""`bench train`: our training step vs transformers' InternVL, packed vs padded, at a tiny size.

The benchmark's numbers are only worth reading if the three runs train the same model on the
same data: checked here through its JSON (identical initial weights by digest, the same
first loss, every run's weights move and its loss on the first batch falls) and, for the data,
directly on `prepare_steps` (the padded rows hold exactly the packed samples).
"""
import json
import math

import torch

from mindspeed_vita.bench.train import RATIOS, RUNS, bench_model_config, prepare_steps
from mindspeed_vita.cli import main


def test_bench_train_json_tiny(capsys):
    assert main(["bench", "train", "--seq-length", "512", "--micro-batch-size", "1",
                 "--steps", "2", "--warmup", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["runs"]) == set(RUNS)
    assert len(out["real_tokens_per_step"]) == 2 and min(out["real_tokens_per_step"]) > 0
    assert 0 <= out["padding_fraction_packed"] < 1 and 0 <= out["padding_fraction_padded"] < 1
    for name, run in out["runs"].items():
        assert math.isfinite(run["tokens_per_s"]) and run["tokens_per_s"] > 0, name
        assert len(run["step_times_s"]) == 2 and len(run["losses"]) == 3, name
        assert run["peak_bytes"] >= 0
        # it trains: the weights move and the loss of the batch it first trained on falls
        assert run["weights_relative_change"] > 0, name
        assert run["first_batch_loss_after"] < run["losses"][0], name
    # one set of weights for all three runs (the transformers model read back through the
    # converter), and so the same loss before the first update (fp32 rounding apart)
    assert out["same_initial_weights"] is True
    first = [out["runs"][name]["losses"][0] for name in RUNS]
    assert max(first) - min(first) <= 1e-5 * abs(first[0])
    assert out["first_loss_max_relative_difference"] <= 1e-5
    # the same optimisation on both sides: the losses stay together (measured ~1e-7)
    for step, losses in enumerate(zip(*(out["runs"][name]["losses"] for name in RUNS))):
        assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), (step, losses)
    assert out["loss_max_relative_difference"] <= 1e-4
    for name, numerator, denominator in RATIOS:
        ratio = out["ratios"][name]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == out["runs"][numerator]["tokens_per_s"] / \
            out["runs"][denominator]["tokens_per_s"]


def test_padded_batches_hold_the_packed_samples(tmp_path):
    from mindspeed_vita.data.synth import write_synthetic_dataset
    from mindspeed_vita.data.tokenizer import load_tokenizer
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    paths = write_synthetic_dataset(str(tmp_path / "data"), seed=0)
    tokenizer = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "tokenizer")))
    steps = prepare_steps(bench_model_config(), tokenizer, paths["stage2"], steps=3,
                          seq_length=512, micro_batch_size=2, seed=3)
    assert len(steps) == 3
    for step in steps:
        packed, padded, lengths = step["packed"], step["padded"], step["lengths"]
        assert packed.tokens.shape == (2, 512) and padded.tokens.shape == (len(lengths),
                                                                          max(lengths))
        assert packed.num_real_tokens == padded.num_real_tokens == sum(lengths)
        starts = packed.cu_seqlens.tolist()
        flat_tokens, flat_labels = packed.tokens.reshape(-1), packed.labels.reshape(-1)
        # the segments that hold a sample (a row's tail padding is a segment of pad tokens)
        segments = [(a, b) for a, b in zip(starts[:-1], starts[1:])
                    if int(flat_tokens[a]) != tokenizer.pad_id]
        assert len(segments) == len(lengths)
        for row, (n, (begin, end)) in enumerate(zip(lengths, segments)):
            assert begin + n <= end
            assert torch.equal(padded.tokens[row, :n], flat_tokens[begin:begin + n])
            assert torch.equal(padded.labels[row, :n], flat_labels[begin:begin + n])
            assert bool((padded.tokens[row, n:] == tokenizer.pad_id).all())
            assert bool((padded.labels[row, n:] == -100).all())
        assert torch.equal(padded.pixel_values, packed.pixel_values)
        assert padded.samples == packed.samples


def test_rows_shorter_than_most_samples_are_refused(capsys):
    assert main(["bench", "train", "--seq-length", "32", "--steps", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seq-length 32" in err[0] and "longer than a row" in err[0]
