"""`data inspect` exit status and wording: non-zero when nothing usable remains, the tokenizer
named once, and the streaming utilisation explained when no row filled up."""

import json
import os

import pytest

from mindspeed_vita.cli import main
from mindspeed_vita.data.inspect import format_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = os.path.join(REPO, "configs", "model", "tiny.yaml")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def test_every_record_rejected_exits_2_after_the_report(tmp_path, capsys, tokenizer_dir):
    noise = tmp_path / "bad.mp4"  # what `head -c 3000 /dev/urandom > bad.mp4` makes
    noise.write_bytes(bytes((i * 197 + 31) % 256 for i in range(3000)))
    capsys.readouterr()
    assert main(["data", "inspect", str(noise), "--tokenizer", tokenizer_dir]) == 2
    captured = capsys.readouterr()
    assert "rejected:" in captured.out  # the report still says why
    errors = [
        line for line in captured.err.splitlines() if line.startswith("mindspeed-vita: error:")
    ]
    assert len(errors) == 1 and captured.err.splitlines()[-1] == errors[0]
    assert "no usable sample: all" in errors[0] and "records were rejected" in errors[0]
    assert "Traceback" not in captured.err


def _inspect(data, tokenizer_dir, *flags):
    """Exit status of `data inspect DATA` with the tiny tokenizer and tiny model config."""
    return main(["data", "inspect", str(data), "--tokenizer", tokenizer_dir, "--model-config",
                 TINY_MODEL, *flags])


def test_some_usable_exits_0_and_the_tokenizer_is_named_once(tmp_path, capsys, tokenizer_dir):
    data = tmp_path / "mixed.jsonl"
    good = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    }
    data.write_text(json.dumps(good) + "\n{not json\n")
    capsys.readouterr()
    assert _inspect(data, tokenizer_dir) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("tokenizer:") == 1
    # one short sample never fills a row while streaming: the report says so in words
    assert "no row filled up before the end of the epoch" in captured.out
    assert "n/a" not in captured.out
    assert _inspect(data, tokenizer_dir, "--strict") == 2
    assert f"{data}:2: " in capsys.readouterr().err


def test_report_wording_when_rows_filled_while_streaming():
    report = {
        "input": "x.jsonl",
        "kind": "jsonl",
        "records": 1,
        "records_per_epoch": 1,
        "elapsed_s": 0.1,
        "mode": "grids_only",
        "tokenizer": {"description": "t"},
        "data": {
            "seed": 1,
            "max_images": 1,
            "max_frames": 1,
            "max_num_frame": 1,
            "seq_length": 8,
            "on_overlong": "drop",
        },
        "model": {
            "image_size": 56,
            "tokens_per_tile": 4,
            "min_tiles": 1,
            "max_tiles": 6,
            "image_layout": "long-vita",
        },
        "sources": {},
        "total": {
            "records": 1,
            "samples": 1,
            "rejected": {},
            "tokens": 8,
            "max_tokens": 8,
            "label_tokens": 1,
            "images": 0,
            "tiles": 0,
            "videos": 0,
            "frames": 0,
        },
        "rejected": {},
        "rejected_examples": {},
        "packing": {
            "mode": "reset",
            "seq_length": 8,
            "lookahead": 1,
            "rows": 1,
            "samples": 1,
            "utilisation": 1.0,
            "real_tokens": 8,
            "slots": 8,
            "streaming_rows": 1,
            "streaming_utilisation": 1.0,
            "dropped_overlong": 0,
            "truncated_overlong": 0,
        },
    }
    assert "without the end-of-epoch flush (as in training): 1 rows, utilisation 100.0%" in (
        format_report(report)
    )
