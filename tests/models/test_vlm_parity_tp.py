"""LongVitaModel with TP=2 (two gloo processes, fp32) against transformers'
`InternVLForConditionalGeneration` run in the test process, with and without sequence parallel,
and checkpoint resharding: a TP=1 checkpoint loads into the TP=2 model, the TP=2 model saves a
TP=2 checkpoint, and that loads back at TP=1 with every tensor and logit bit-identical."""
import os

import pytest
import torch

from mindspeed_vita.convert.checkpoint import read_full_state, read_metadata, write_checkpoint
from mindspeed_vita.convert.hf_internvl import import_internvl
from tests.dist_utils import run_distributed
from tests.tiny_hf import IMAGE_SIZE, TOKENS_PER_TILE, save_tiny_internvl

TOL = 1e-4  # fp32 parity bound


def batches(tokenizer):
    """(text ids, image ids, pixels): rows of even length (sequence parallel splits s by 2)."""
    ctx = [tokenizer.img_context_id] * TOKENS_PER_TILE
    tail = tokenizer.encode(" What is in the picture? Answer in detail, please.")
    row0 = (tokenizer.encode("Look") + [tokenizer.img_start_id] + ctx * 2
            + [tokenizer.img_end_id])
    row1 = tokenizer.encode("A picture:") + [tokenizer.img_start_id] + ctx + [tokenizer.img_end_id]
    n = max(len(row0), len(row1)) + 4
    n += n % 2
    image_ids = torch.tensor([(row0 + tail)[:n], (row1 + tail)[:n]])
    text = [tokenizer.encode("The dog is sleeping under the old tree."),
            tokenizer.encode("Two children are playing in the garden.")]
    m = min(len(t) for t in text) // 2 * 2
    text_ids = torch.tensor([t[:m] for t in text])
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))
    return text_ids, image_ids, pixels


def _logits(model, text_ids, image_ids, pixels):
    def positions(ids):
        return torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)

    with torch.no_grad():
        return (model.logits(text_ids, positions(text_ids)),
                model.logits(image_ids, positions(image_ids), pixels))


def _tp2_body(rank, world_size, hf_dir, tp1_dir, tp2_dir, text_ids, image_ids, pixels):
    from backends import get_backend
    from mindspeed_vita.convert.checkpoint import save_checkpoint
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import initialize_parallel

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout(tp=world_size))
    out = {}
    for sp in (False, True):
        # the TP=1 native checkpoint, resharded to this rank's TP=2 slice on load
        model, tokenizer, _ = load_pretrained(tp1_dir, backend,
                                              groups=groups.with_sequence_parallel(sp))
        out[sp] = _logits(model.eval(), text_ids, image_ids, pixels)
    out["hf_dir"] = _logits(load_pretrained(hf_dir, backend, groups=groups)[0].eval(), text_ids,
                            image_ids, pixels)
    save_checkpoint(model, tp2_dir, tokenizer)
    reloaded, _, _ = load_pretrained(tp2_dir, backend, groups=groups.with_sequence_parallel(True))
    out["tp2_reloaded"] = _logits(reloaded.eval(), text_ids, image_ids, pixels)
    out["language_shard"] = {k: v.clone() for k, v in model.state_dict().items()
                             if k.startswith("language.") and isinstance(v, torch.Tensor)}
    return out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    hf_dir, tp1_dir, tp2_dir = (str(root / n) for n in ("hf", "tp1", "tp2"))
    hf = save_tiny_internvl(hf_dir, seed=21)
    native = import_internvl(hf_dir)
    write_checkpoint(native, tp1_dir, tp_size=1)
    text_ids, image_ids, pixels = batches(native.tokenizer)
    results = run_distributed(_tp2_body, world_size=2,
                              args=(hf_dir, tp1_dir, tp2_dir, text_ids, image_ids, pixels))
    with torch.no_grad():
        reference = (hf(input_ids=text_ids).logits,
                     hf(input_ids=image_ids, pixel_values=pixels).logits)
    return dict(results=results, reference=reference, tp1_dir=tp1_dir, tp2_dir=tp2_dir,
                inputs=(text_ids, image_ids, pixels))


@pytest.mark.parametrize("key", [False, True, "hf_dir"],
                         ids=["tp2", "tp2-sequence-parallel", "tp2-from-hf-dir"])
def test_tp2_logits_match_transformers(tp2_run, key):
    for rank_result in tp2_run["results"]:
        for ours, ref in zip(rank_result[key], tp2_run["reference"]):
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() <= TOL


def test_tp2_checkpoint_reloads_exactly(tp2_run):
    meta = read_metadata(tp2_run["tp2_dir"])
    assert meta.tp_size == 2
    assert sorted(os.listdir(tp2_run["tp2_dir"])) == sorted(
        ["mindspeed_vita.json", "tokenizer", "model-tp00-of-02.safetensors",
         "model-tp01-of-02.safetensors"])
    for rank_result in tp2_run["results"]:
        for before, after in zip(rank_result[True], rank_result["tp2_reloaded"]):
            assert torch.equal(before, after)
    shards = [r["language_shard"] for r in tp2_run["results"]]
    qkv = "language.decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.equal(shards[0][qkv], shards[1][qkv])  # really two different halves


def test_tp1_to_tp2_and_back_is_bit_identical(tp2_run):
    """The TP=2 checkpoint (saved after loading the TP=1 one) gathers back to the same tensors,
    and a TP=1 model loaded from it gives bit-identical logits."""
    from backends import get_backend
    from mindspeed_vita.models.build import load_pretrained
    from mindspeed_vita.parallel.layout import ParallelLayout
    from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

    _, original = read_full_state(tp2_run["tp1_dir"])
    _, round_trip = read_full_state(tp2_run["tp2_dir"])
    assert sorted(original) == sorted(round_trip)
    assert all(torch.equal(original[k], round_trip[k]) for k in original)

    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        before = _logits(load_pretrained(tp2_run["tp1_dir"], backend, groups=groups)[0].eval(),
                         *tp2_run["inputs"])
        after = _logits(load_pretrained(tp2_run["tp2_dir"], backend, groups=groups)[0].eval(),
                        *tp2_run["inputs"])
    finally:
        destroy_parallel()
    for a, b, ref in zip(before, after, tp2_run["reference"]):
        assert torch.equal(a, b)
        assert (a - ref).abs().max().item() <= TOL
