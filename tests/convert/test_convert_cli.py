"""`mindspeed-vita convert import-hf / export-hf` on tiny HF directories written by transformers:
bit-exact round trips, the Qwen2 + InternViT stage-1 import, vocabulary extension, and one
clear error line per kind of bad input."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from mindspeed_vita.cli import main
from mindspeed_vita.convert.checkpoint import read_full_state, read_metadata, weight_file_name
from mindspeed_vita.convert.hf_split import fresh_projector_state, import_split
from mindspeed_vita.convert.qwen2_weights import hf_to_native_qwen2
from mindspeed_vita.convert.vision_weights import hf_internvit_to_native
from mindspeed_vita.data.tokenizer import LONG_VITA_SPECIAL_TOKENS, load_tokenizer
from tests.tiny_hf import save_tiny_internvit, save_tiny_internvl, save_tiny_qwen2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    paths = {name: str(root / name) for name in ("internvl", "qwen2", "internvit")}
    save_tiny_internvl(paths["internvl"])
    qwen2 = save_tiny_qwen2(paths["qwen2"])
    save_tiny_internvit(paths["internvit"])
    paths["qwen2_state"] = qwen2.state_dict()
    return paths


def convert(*argv):
    return main(["convert", *argv])


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


# --------------------------------------------------------------- round trips
@pytest.mark.parametrize("tie", [False, True])
def test_internvl_import_export_is_bit_exact(tmp_path, capsys, tie):
    src, native, out = (str(tmp_path / n) for n in ("hf", "native", "exported"))
    save_tiny_internvl(src, seed=3, tie_word_embeddings=tie)
    assert convert("import-hf", src, native, "--tp", "2") == 0
    assert convert("export-hf", native, out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]",
                                            "[1/3]", "[2/3]", "[3/3]"]

    meta = read_metadata(native)
    assert meta.tp_size == 2 and meta.model_config.projector.variant == "internvl"
    assert meta.model_config.language.tie_word_embeddings == tie
    assert sorted(os.listdir(native)) == sorted(["mindspeed_vita.json", "tokenizer",
                                                 weight_file_name(0, 2), weight_file_name(1, 2)])
    original = load_file(os.path.join(src, "model.safetensors"))
    assert ("language_model.lm_head.weight" in original) == (not tie)
    assert_same_tensors(load_file(os.path.join(out, "model.safetensors")), original)
    config_in = json.load(open(os.path.join(src, "config.json")))
    config_out = json.load(open(os.path.join(out, "config.json")))
    assert config_out == config_in
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(os.path.join(out, name)).read() == open(os.path.join(src, name)).read()


def test_qwen2_plus_internvit_import(dirs, tmp_path, capsys):
    native = str(tmp_path / "native")
    assert convert("import-hf", dirs["qwen2"], native, "--vision", dirs["internvit"],
                   "--tp", "2", "--seed", "7") == 0
    assert "new long-vita projector (seed 7)" in capsys.readouterr().out
    meta, state = read_full_state(native)
    cfg = meta.model_config
    assert cfg.projector.variant == "long-vita" and cfg.image_layout == "long-vita"
    assert cfg.vision.num_layers == 2 and cfg.vision.layer_scale_init == 0.1
    assert cfg.language.vocab_size == 1000  # the tokenizer (480 ids) fits: no growth

    vision = hf_internvit_to_native(load_file(os.path.join(dirs["internvit"],
                                                           "model.safetensors")))
    assert_same_tensors({k[len("vision."):]: v for k, v in state.items()
                         if k.startswith("vision.")}, vision)
    projector = {k[len("projector."):]: v for k, v in state.items()
                 if k.startswith("projector.")}
    assert_same_tensors(projector, fresh_projector_state(cfg, seed=7))
    assert sorted(projector) == ["fc1.weight", "fc2.weight", "norm.bias", "norm.weight"]
    assert not torch.equal(projector["fc1.weight"],
                           fresh_projector_state(cfg, seed=8)["fc1.weight"])

    # the tokenizer got the Long-VITA tokens; their rows are the mean of the 465 known rows
    tokenizer = load_tokenizer(os.path.join(native, "tokenizer"))
    source_size = len(AutoTokenizer.from_pretrained(dirs["qwen2"]))
    assert source_size == 465 and len(tokenizer) == 465 + len(LONG_VITA_SPECIAL_TOKENS)
    added = torch.tensor([tokenizer.token_to_id(t) for t in LONG_VITA_SPECIAL_TOKENS])
    hf = dirs["qwen2_state"]
    for hf_key, native_key in (("model.embed_tokens.weight", "embedding.word_embeddings.weight"),
                               ("lm_head.weight", "output_layer.weight")):
        table = state["language." + native_key]
        assert torch.allclose(table[added], hf[hf_key][:465].mean(0).expand(len(added), -1))
        keep = torch.ones(1000, dtype=torch.bool)
        keep[added] = False
        assert torch.equal(table[:1000][keep], hf[hf_key][keep])
    layers = {k: v for k, v in hf_to_native_qwen2(hf, cfg.language, 0, 1).items()
              if k.startswith("decoder.")}
    assert all(torch.equal(state["language." + k], v) for k, v in layers.items())


def test_long_vita_projector_export_round_trips(dirs, tmp_path, capsys):
    native, out, again = (str(tmp_path / n) for n in ("native", "hf", "again"))
    assert convert("import-hf", dirs["qwen2"], native, "--vision", dirs["internvit"]) == 0
    assert convert("export-hf", native, out) == 0
    assert "long_vita_projector.*" in capsys.readouterr().out
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(k for k in exported if "projector" in k) == [
        "long_vita_projector.layer_norm.bias", "long_vita_projector.layer_norm.weight",
        "long_vita_projector.linear_1.weight", "long_vita_projector.linear_2.weight"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["mindspeed_vita"] == {"projector_variant": "long-vita",
                                        "image_layout": "long-vita"}
    assert config["text_config"]["vocab_size"] == 1000
    assert convert("import-hf", out, again) == 0
    meta_a, state_a = read_full_state(native)
    meta_b, state_b = read_full_state(again)
    assert meta_a.model_config == meta_b.model_config
    assert_same_tensors(state_a, state_b)


def test_vocabulary_grows_when_tokens_do_not_fit(tmp_path):
    qwen2_dir = str(tmp_path / "qwen2")
    hf = save_tiny_qwen2(qwen2_dir, vocab_size=465).state_dict()  # exactly the tokenizer size
    save_tiny_internvit(str(tmp_path / "vit"))
    native = import_split(qwen2_dir, str(tmp_path / "vit"), projector_variant="internvl")
    grown = 465 + len(LONG_VITA_SPECIAL_TOKENS)
    assert native.cfg.language.vocab_size == grown == len(native.tokenizer)
    assert native.cfg.projector.variant == "internvl"
    embedding = native.state["language.embedding.word_embeddings.weight"]
    assert embedding.shape[0] == 512  # padded to a multiple of 128 at tp=1
    assert torch.equal(embedding[:465], hf["model.embed_tokens.weight"])
    assert torch.allclose(embedding[465:grown], hf["model.embed_tokens.weight"].mean(0).expand(
        len(LONG_VITA_SPECIAL_TOKENS), -1))
    assert torch.count_nonzero(embedding[grown:]) == 0


# ------------------------------------------------------------------ bad input
def error_of(capsys, *argv) -> str:
    assert convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mindspeed-vita: error: ") and "\n" not in err
    return err


def test_bad_invocations_give_one_clear_line(dirs, tmp_path, capsys):
    dst = str(tmp_path / "dst")
    assert "give its vision encoder with --vision" in error_of(
        capsys, "import-hf", dirs["qwen2"], dst)
    assert f"--vision {dirs['qwen2']!r} is a hf-qwen2 directory, not an InternViT" in error_of(
        capsys, "import-hf", dirs["qwen2"], dst, "--vision", dirs["qwen2"])
    assert "--vision pairs a vision encoder with a Qwen2" in error_of(
        capsys, "import-hf", dirs["internvl"], dst, "--vision", dirs["internvit"])
    assert "'language.num_attention_heads' = 4 is not divisible by --tp = 3" in error_of(
        capsys, "import-hf", dirs["internvl"], dst, "--tp", "3")
    assert "holds a internvl projector" in error_of(
        capsys, "import-hf", dirs["internvl"], dst, "--projector", "long-vita")
    assert not os.path.exists(dst)

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert f"{llama}/config.json: model_type 'llama' is not supported" in error_of(
        capsys, "import-hf", str(llama), dst)
    assert "missing: no such directory" in error_of(capsys, "export-hf", str(tmp_path / "missing"), dst)
    assert f"destination {str(llama)!r} already exists" in error_of(
        capsys, "import-hf", dirs["internvl"], str(llama))


def test_unsupported_internvl_option_names_the_config_key(dirs, tmp_path, capsys):
    src = str(tmp_path / "qknorm")
    shutil.copytree(dirs["internvl"], src)
    config_path = os.path.join(src, "config.json")
    config = json.load(open(config_path))
    config["vision_config"]["use_qk_norm"] = True
    json.dump(config, open(config_path, "w"))
    assert f"{config_path}: vision_config.use_qk_norm=True is not supported" in error_of(
        capsys, "import-hf", src, str(tmp_path / "dst"))


def test_wrong_tensor_shape_in_hf_weights_is_named(dirs, tmp_path, capsys):
    src = str(tmp_path / "narrow")
    shutil.copytree(dirs["internvl"], src)
    config_path = os.path.join(src, "config.json")
    config = json.load(open(config_path))
    config["text_config"]["intermediate_size"] = 96  # the weights have 128
    json.dump(config, open(config_path, "w"))
    message = error_of(capsys, "import-hf", src, str(tmp_path / "dst"))
    assert "'model.layers.0.mlp.gate_proj.weight' has shape (128, 64), expected (96, 64)" \
        in message


def test_export_writes_generation_config_with_the_stop_tokens(dirs, tmp_path):
    # Qwen2.5-Instruct's own settings: sampling on, <|im_end|> as its eos
    src, native, out = (str(tmp_path / n) for n in ("hf", "native", "exported"))
    shutil.copytree(dirs["internvl"], src)
    tokenizer = load_tokenizer(src)
    source = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
              "repetition_penalty": 1.05, "eos_token_id": tokenizer.im_end_id,
              "transformers_version": "4.37.0"}
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump(source, f)
    assert convert("import-hf", src, native) == 0
    assert read_metadata(native).hf_generation_config == source
    assert convert("export-hf", native, out) == 0
    written = json.load(open(os.path.join(out, "generation_config.json")))
    assert written == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                       "repetition_penalty": 1.05,
                       "eos_token_id": sorted(tokenizer.stop_token_ids),
                       "pad_token_id": tokenizer.pad_id}
    assert tokenizer.im_end_id in written["eos_token_id"] and len(written["eos_token_id"]) == 2
    # transformers reads it back as the model's generation settings
    from transformers import GenerationConfig

    loaded = GenerationConfig.from_pretrained(out)
    assert loaded.do_sample and loaded.eos_token_id == sorted(tokenizer.stop_token_ids)


def test_split_import_keeps_the_qwen2_generation_config(dirs, tmp_path):
    qwen2 = str(tmp_path / "qwen2")
    shutil.copytree(dirs["qwen2"], qwen2)
    with open(os.path.join(qwen2, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 7, "temperature": 0.5, "do_sample": True}, f)
    native, out = str(tmp_path / "native"), str(tmp_path / "out")
    assert convert("import-hf", qwen2, native, "--vision", dirs["internvit"]) == 0
    assert convert("export-hf", native, out) == 0
    written = json.load(open(os.path.join(out, "generation_config.json")))
    tokenizer = load_tokenizer(os.path.join(native, "tokenizer"))
    assert written["bos_token_id"] == 7 and written["temperature"] == 0.5
    assert written["eos_token_id"] == sorted(tokenizer.stop_token_ids)
