"""Native checkpoint format: tensor-parallel resharding against the HF round trip, save/load
exactness, metadata, atomic replacement, and one clear error per kind of bad checkpoint."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from backends import get_backend
from mindspeed_vita.config.model import LanguageConfig
from mindspeed_vita.convert.checkpoint import (
    METADATA_FILE, NativeModel, load_checkpoint, read_full_state, read_metadata,
    reshard_language_tensor, save_checkpoint, weight_file_name, write_checkpoint)
from mindspeed_vita.convert.qwen2_weights import hf_to_native_qwen2
from mindspeed_vita.errors import CheckpointError, UserInputError
from mindspeed_vita.models.build import build_model, load_pretrained
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel
from tests.tiny_hf import randomize_, save_tiny_qwen2, save_tiny_tokenizer, tiny_model_config


@pytest.fixture(scope="module")
def groups():
    yield initialize_parallel(get_backend("cpu"), ParallelLayout())
    destroy_parallel()


@pytest.fixture(scope="module")
def backend(groups):
    return get_backend("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return save_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")),
                               with_long_vita_tokens=True)


def random_model(backend, groups, tokenizer, seed, **language_overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(projector="long-vita", **language_overrides), backend,
                        groups=groups, tokenizer=tokenizer)
    with torch.no_grad():  # megatron zero-inits biases and sets norms to 1: make all visible
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        # rows past the vocabulary are tp padding: zero, as every converter writes them
        vocab = model.cfg.language.vocab_size
        model.language.embedding.word_embeddings.weight[vocab:] = 0
        model.language.output_layer.weight[vocab:] = 0
    return model.eval()


def tensors(model):
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------ resharding
@pytest.mark.parametrize("tp_from,tp_to", [(1, 2), (2, 1), (1, 4), (4, 2), (2, 2)])
def test_reshard_equals_hf_round_trip(tp_from, tp_to):
    """Direct resharding == native_to_hf_qwen2 then hf_to_native_qwen2 at the new tp. The
    vocabulary (1100) pads differently at every tp (1152 / 1280 / 1536 rows)."""
    cfg = LanguageConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=128, vocab_size=1100, max_position_embeddings=4096)
    hf_model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1100, tie_word_embeddings=False))
    randomize_(hf_model, seed=0)
    hf = hf_model.state_dict()
    sources = [hf_to_native_qwen2(hf, cfg, r, tp_from) for r in range(tp_from)]
    for rank in range(tp_to):
        expected = hf_to_native_qwen2(hf, cfg, rank, tp_to)
        for name, want in expected.items():
            got = reshard_language_tensor(name, [s[name] for s in sources], cfg, tp_to, rank)
            assert torch.equal(got, want), (name, rank)


def test_reshard_rejects_an_uneven_split():
    cfg = LanguageConfig(hidden_size=64, num_layers=1, num_attention_heads=4, num_query_groups=2,
                         ffn_hidden_size=128, vocab_size=1000)
    with pytest.raises(CheckpointError, match=r"'decoder.layers.0.mlp.linear_fc2.weight'.*tp=3"):
        reshard_language_tensor("decoder.layers.0.mlp.linear_fc2.weight",
                                [torch.zeros(64, 128)], cfg, 3, 0)


# --------------------------------------------------------------- save / load
def test_save_then_load_is_exact(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, seed=1)
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, tokenizer)
    assert sorted(os.listdir(path)) == sorted([METADATA_FILE, "tokenizer",
                                               weight_file_name(0, 1)])
    meta = read_metadata(path)
    assert meta.tp_size == 1 and meta.dtype == "float32"
    assert meta.model_config == model.cfg
    assert meta.context_token_ids == {"<IMG_CONTEXT>": tokenizer.img_context_id,
                                      "<PATCH_CONTEXT>": tokenizer.patch_context_id,
                                      "<VID_CONTEXT>": tokenizer.vid_context_id}
    raw = json.load(open(os.path.join(path, METADATA_FILE)))
    assert raw["format_version"] == 1 and raw["weight_files"] == [weight_file_name(0, 1)]

    other = random_model(backend, groups, tokenizer, seed=2)
    load_checkpoint(path, other)
    want, got = tensors(model), tensors(other)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)

    loaded, loaded_tokenizer, cfg = load_pretrained(path, backend, groups=groups)
    assert cfg == model.cfg and len(loaded_tokenizer) == len(tokenizer)
    ids = torch.tensor([tokenizer.encode("The dog is sleeping under the tree.")])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        assert torch.equal(model.logits(ids, positions), loaded.eval().logits(ids, positions))


def test_written_at_tp2_loads_at_tp1(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, seed=3)
    native = NativeModel(cfg=model.cfg, state=tensors(model), tokenizer=tokenizer)
    path = str(tmp_path / "tp2")
    meta = write_checkpoint(native, path, tp_size=2)
    assert meta.weight_files == [weight_file_name(0, 2), weight_file_name(1, 2)]
    shard = load_file(os.path.join(path, weight_file_name(1, 2)))
    full_qkv = native.state["language.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(shard["language.decoder.layers.0.self_attention.linear_qkv.weight"],
                       full_qkv[full_qkv.shape[0] // 2:])
    assert torch.equal(shard["vision.layers.0.attn.qkv.weight"],
                       native.state["vision.layers.0.attn.qkv.weight"])  # replicated
    other = random_model(backend, groups, tokenizer, seed=4)
    load_checkpoint(path, other)
    got = tensors(other)
    assert all(torch.equal(got[k], v) for k, v in native.state.items())
    _, gathered = read_full_state(path)
    assert all(torch.equal(gathered[k], v) for k, v in native.state.items())


class _FailingTokenizer:
    """Delegates to a real tokenizer but fails while being written (a crash mid-save)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def save(self, out_dir):
        raise OSError("disk full")


def test_save_replaces_atomically(backend, tokenizer, tmp_path, groups):
    path = str(tmp_path / "ckpt")
    first = random_model(backend, groups, tokenizer, 5)
    second = random_model(backend, groups, tokenizer, 6)
    save_checkpoint(first, path, tokenizer)
    save_checkpoint(second, path, tokenizer)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .partial / .old left behind
    restored = random_model(backend, groups, tokenizer, 7)
    load_checkpoint(path, restored)
    assert all(torch.equal(v, tensors(second)[k]) for k, v in tensors(restored).items())

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(first, path, _FailingTokenizer(tokenizer))
    load_checkpoint(path, restored)  # the previous checkpoint is still complete
    assert all(torch.equal(v, tensors(second)[k]) for k, v in tensors(restored).items())


# ------------------------------------------------------------------ bad input
def test_shape_mismatch_names_tensor_shapes_and_config_key(backend, tokenizer, tmp_path, groups):
    path = str(tmp_path / "hidden32")
    save_checkpoint(random_model(backend, groups, tokenizer, 8, hidden_size=32), path, tokenizer)
    model = random_model(backend, groups, tokenizer, 9)  # hidden 64
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, model)
    message = str(err.value)
    assert weight_file_name(0, 1) in message
    assert "tensor 'projector.fc2.weight' has shape (32, 32)" in message
    assert "expects (64, 32)" in message
    assert "language.hidden_size (config 64, checkpoint 32)" in message


def test_missing_weight_file_is_named(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, 10)
    path = str(tmp_path / "tp2")
    write_checkpoint(NativeModel(model.cfg, tensors(model), tokenizer), path, tp_size=2)
    os.remove(os.path.join(path, weight_file_name(1, 2)))
    with pytest.raises(CheckpointError, match=r"lacks weight file model-tp01-of-02\.safetensors"):
        load_checkpoint(path, model)


def test_missing_and_unexpected_tensors_are_named(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, 11)
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, tokenizer)
    file = os.path.join(path, weight_file_name(0, 1))
    state = load_file(file)
    state.pop("language.decoder.final_layernorm.weight")
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"model-tp00-of-01\.safetensors has no tensor "
                                              r"'language\.decoder\.final_layernorm\.weight'"):
        load_checkpoint(path, model)

    deeper = str(tmp_path / "three_layers")
    save_checkpoint(random_model(backend, groups, tokenizer, 12, num_layers=3), deeper, tokenizer)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(deeper, model)
    assert "tensor 'language.decoder.layers.2." in str(err.value)
    assert "language.num_layers (config 2, checkpoint 3)" in str(err.value)
    assert weight_file_name(0, 1) in str(err.value)


def test_bad_metadata_is_named(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / METADATA_FILE).write_text('{"format": "mindspeed-vita-checkpoint",\n  "tp_size": }')
    with pytest.raises(CheckpointError, match=r"mindspeed_vita\.json: invalid JSON at line 2"):
        read_metadata(str(path))
    meta = {"format": "mindspeed-vita-checkpoint", "format_version": 1, "tp_size": 1,
            "dtype": "float32", "model_config": {"language": {"hidden_sise": 4}},
            "context_token_ids": {"<IMG_CONTEXT>": 1, "<PATCH_CONTEXT>": 2, "<VID_CONTEXT>": 3}}
    (path / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"model_config\.language\.hidden_sise"):
        read_metadata(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_metadata(str(tmp_path / "nowhere"))


def test_unknown_directory_type_is_named(backend, tmp_path, groups):
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"llama/config\.json: model_type 'llama' is not "
                                              r"supported"):
        load_pretrained(str(llama), backend, groups=groups)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"'.*empty' is neither a mindspeed-vita "
                                              r"checkpoint"):
        load_pretrained(str(empty), backend, groups=groups)
    qwen2 = str(tmp_path / "qwen2")
    save_tiny_qwen2(qwen2)
    with pytest.raises(CheckpointError, match=r"is a hf-qwen2 directory, not a full model"):
        load_pretrained(qwen2, backend, groups=groups)


def test_context_token_mismatch_is_named(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, 13)
    path = str(tmp_path / "ckpt")
    save_checkpoint(model, path, tokenizer)
    meta_file = os.path.join(path, METADATA_FILE)
    meta = json.load(open(meta_file))
    meta["context_token_ids"]["<VID_CONTEXT>"] = 5
    json.dump(meta, open(meta_file, "w"))
    with pytest.raises(CheckpointError, match=r"context token ids .* build it with the "
                                              r"checkpoint's tokenizer"):
        load_checkpoint(path, model)


def test_bf16_checkpoint_loads_into_an_fp32_model(backend, tokenizer, tmp_path, groups):
    model = random_model(backend, groups, tokenizer, 14)
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors(model).items()}
    cfg = model.cfg.model_copy(update={"params_dtype": "bfloat16"})
    path = str(tmp_path / "bf16")
    assert write_checkpoint(NativeModel(cfg, bf16, tokenizer), path).dtype == "bfloat16"
    assert load_file(os.path.join(path, weight_file_name(0, 1)))[
        "vision.class_embedding"].dtype == torch.bfloat16
    loaded, _, loaded_cfg = load_pretrained(path, backend, groups=groups,
                                            config_update={"params_dtype": "float32"})
    assert loaded_cfg.params_dtype == "float32"
    got = tensors(loaded)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], v.float())
               for k, v in bf16.items())
    with pytest.raises(UserInputError, match=r"model config override params_dtype"):
        load_pretrained(path, backend, groups=groups, config_update={"params_dtype": "float64"})
