"""The tiny Qwen2-like tokenizer and the Long-VITA tokenizer wrapper."""
import json
import os

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from mindspeed_vita.data.tokenizer import (LONG_VITA_SPECIAL_TOKENS, TokenizerError,
                                           load_tokenizer)
from mindspeed_vita.demo.tiny_tokenizer import (QWEN2_PRETOKENIZE_REGEX, QWEN2_SPECIAL_TOKENS,
                                                build_tiny_tokenizer)

TEXT = "Describe the image in détail: 12 cats, 3 dogs!\n\n  It's   late.\tOK 你好"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tiny_tok")))


def _read(directory, name):
    with open(os.path.join(directory, name), "rb") as f:
        return f.read()


def test_build_twice_gives_identical_files(tiny_dir, tmp_path):
    again = build_tiny_tokenizer(str(tmp_path / "again"))
    assert sorted(os.listdir(again)) == ["tokenizer.json", "tokenizer_config.json"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert _read(tiny_dir, name) == _read(again, name)


def test_pretokenizer_is_qwen2s():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_PRETOKENIZE_REGEX == PRETOKENIZE_REGEX


def test_autotokenizer_matches_the_saved_pipeline(tiny_dir):
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    raw = Tokenizer.from_file(os.path.join(tiny_dir, "tokenizer.json"))
    chatml = f"<|im_start|>user\n{TEXT}<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    assert hf.encode(chatml, add_special_tokens=False) == raw.encode(chatml).ids
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    assert hf.bos_token is None
    # Qwen2 order: the specials follow the BPE vocabulary
    base = raw.get_vocab_size(with_added_tokens=False)
    assert [hf.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_TOKENS] == [base, base + 1, base + 2]


def test_chat_template_is_plain_chatml(tiny_dir):
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    prompt = hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_total_vocab_stays_below_vocab_size(tiny_dir, tmp_path):
    assert len(load_tokenizer(tiny_dir)) < 1000
    small = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "small"), vocab_size=300))
    assert len(small) < 300
    assert max(small.hf.get_vocab().values()) < 300


def test_too_small_vocab_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=270 is too small"):
        build_tiny_tokenizer(str(tmp_path / "x"), vocab_size=270)


def test_long_vita_tokens_are_added_as_single_special_ids(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    base = len(AutoTokenizer.from_pretrained(tiny_dir))
    vocab = tok.hf.get_vocab()
    ids = [vocab[t] for t in LONG_VITA_SPECIAL_TOKENS]
    assert ids == list(range(base, base + len(LONG_VITA_SPECIAL_TOKENS)))
    assert len(tok) == base + len(LONG_VITA_SPECIAL_TOKENS)
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == tuple(ids[0:3])
    # the release's order: img, vid, patch triples, then quad/ref/box pairs, then the two tags
    assert (tok.vid_start_id, tok.vid_end_id, tok.vid_context_id) == tuple(ids[3:6])
    assert (tok.patch_start_id, tok.patch_end_id, tok.patch_context_id) == tuple(ids[6:9])
    assert tok.context_token_ids == {ids[2], ids[5], ids[8]}
    assert tok.token_to_id("</box>") == ids[-3]
    assert (tok.token_to_id("<image>"), tok.token_to_id("<video>")) == tuple(ids[-2:])
    assert tok.im_start_id == vocab["<|im_start|>"] and tok.im_end_id == vocab["<|im_end|>"]
    assert tok.eos_id == tok.im_end_id
    assert tok.pad_id == vocab["<|endoftext|>"]
    assert tok.stop_token_ids == {tok.im_end_id, vocab["<|endoftext|>"]}
    # each added token is one id even when glued to text
    assert tok.encode("a<IMG_CONTEXT>b") == tok.encode("a") + [tok.img_context_id] + tok.encode("b")
    with pytest.raises(TokenizerError, match="no token '<nope>'"):
        tok.token_to_id("<nope>")


def test_encode_has_no_bos_and_round_trips(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = tok.encode(TEXT)
    assert ids == tok.hf.encode(TEXT, add_special_tokens=False)
    assert not set(ids) & {tok.im_start_id, tok.im_end_id, tok.pad_id}
    assert tok.decode(ids) == TEXT
    assert tok.encode("") == []


def test_decode_skips_special_tokens_on_request(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    ids = [tok.im_start_id] + tok.encode("user\nhi") + [tok.img_start_id, tok.img_context_id,
                                                        tok.img_end_id, tok.im_end_id]
    assert tok.decode(ids) == "<|im_start|>user\nhi<img><IMG_CONTEXT></img><|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_save_and_reload_keeps_every_id(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert len(again) == len(tok)
    assert again.hf.get_vocab() == tok.hf.get_vocab()
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert (again.img_context_id, again.eos_id, again.pad_id) == (
        tok.img_context_id, tok.eos_id, tok.pad_id)


def test_missing_directory_is_named(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(TokenizerError, match="no_such_tokenizer.*does not exist"):
        load_tokenizer(missing)


def test_unloadable_directory_is_named(tmp_path):
    broken = tmp_path / "broken_tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(TokenizerError, match="cannot load a tokenizer from .*broken_tok"):
        load_tokenizer(str(broken))


def test_non_chatml_tokenizer_is_refused(tiny_dir, tmp_path):
    data = json.loads(_read(tiny_dir, "tokenizer.json"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_start|>"]
    plain = tmp_path / "plain_tok"
    plain.mkdir()
    (plain / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads(_read(tiny_dir, "tokenizer_config.json"))
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"plain_tok.*lacks \['<\|im_start\|>'\]"):
        load_tokenizer(str(plain))


# ------------------------------------------- read directly (tokenizers) vs transformers
SAMPLES = [
    TEXT, "", "\n", "\n\n  \t", " leading space", "trailing  ", "<|im_start|>user\nHi<|im_end|>\n",
    "a<IMG_CONTEXT>b<image>\n<video>c", "<box>(10,20),(30,40)</box> <ref>the dog</ref>",
    "naïve café 🙂 – ‘quotes’ “double” ½ ﬁ", "x" * 300, "1234567890 3.14159", "I'm, you're!!",
    "<|endoftext|>after the end", "<img></img><patch></patch><vid></vid><quad></quad>",
]


def _release_dir(out):
    from tests.tiny_long_vita import save_release_tokenizer

    save_release_tokenizer(out)
    return out


def _v4_config_dir(tiny_dir, out):
    """The tiny tokenizer with a transformers-4 style config (as Qwen2.5's): every added token
    listed under `added_tokens_decoder`, a special_tokens_map.json that agrees."""
    os.makedirs(out)
    data = json.loads(_read(tiny_dir, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    config = json.loads(_read(tiny_dir, "tokenizer_config.json"))
    config["tokenizer_class"] = "Qwen2TokenizerFast"
    config["added_tokens_decoder"] = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                         "single_word", "special")}
        for t in data["added_tokens"]}
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": {"content": "<|im_end|>", "special": True},
                   "pad_token": "<|endoftext|>"}, f)
    return out


@pytest.fixture(scope="module")
def qwen2_style_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_style")
    return {"tiny": tiny_dir, "release-17-added": _release_dir(str(root / "release")),
            "transformers-4-config": _v4_config_dir(tiny_dir, str(root / "v4"))}


def _reference(path):
    """What load_tokenizer gave before it read tokenizer.json itself: AutoTokenizer, then the
    Long-VITA tokens it lacks added as special tokens."""
    from mindspeed_vita.data.tokenizer import VitaTokenizer, _TransformersEngine

    hf = AutoTokenizer.from_pretrained(path)
    vocab = hf.get_vocab()
    missing = [t for t in LONG_VITA_SPECIAL_TOKENS if t not in vocab]
    from tokenizers import AddedToken

    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                  special_tokens=True)
    return VitaTokenizer(_TransformersEngine(hf), path)


ID_ATTRIBUTES = ("img_start_id", "img_end_id", "img_context_id", "patch_start_id",
                 "patch_end_id", "patch_context_id", "vid_start_id", "vid_end_id",
                 "vid_context_id", "im_start_id", "im_end_id", "endoftext_id", "bos_id",
                 "eos_id", "pad_id", "context_token_ids", "stop_token_ids")


def _assert_same_tokenizer(tok, ref):
    assert len(tok) == len(ref)
    assert tok.get_vocab() == ref.get_vocab()
    for name in ID_ATTRIBUTES:
        assert getattr(tok, name) == getattr(ref, name), name
    for token in LONG_VITA_SPECIAL_TOKENS + QWEN2_SPECIAL_TOKENS:
        assert tok.token_to_id(token) == ref.token_to_id(token), token
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip), (text, skip)
    every_id = list(range(len(tok)))
    for skip in (False, True):
        assert tok.decode(every_id, skip) == ref.decode(every_id, skip)


@pytest.mark.parametrize("kind", ["tiny", "release-17-added", "transformers-4-config"])
def test_direct_read_equals_transformers(qwen2_style_dirs, kind):
    path = qwen2_style_dirs[kind]
    tok = load_tokenizer(path)
    assert tok.engine == "tokenizers"  # read from tokenizer.json, not through AutoTokenizer
    _assert_same_tokenizer(tok, _reference(path))


def test_direct_read_renders_conversations_as_transformers(qwen2_style_dirs):
    """The template's ids and labels (media spans, the role header as its own piece) do not
    depend on which library read the tokenizer."""
    from mindspeed_vita.data.template import render_conversation
    from mindspeed_vita.data.types import Message

    turns = [Message("system", "Be brief."),
             Message("user", "\n\n  <image>\nWhat is in <video> and the picture?"),
             Message("assistant", " A dog\nsleeps. <box>(1,2)</box>"),
             Message("user", "And then?"), Message("assistant", "It wakes up.")]
    for path in qwen2_style_dirs.values():
        tok, ref = load_tokenizer(path), _reference(path)
        for generate in (False, True):
            kwargs = dict(image_grids=[(2, 1)], video_frames=[3], tokens_per_tile=4,
                          add_generation_prompt=generate)
            assert render_conversation(turns, tok, **kwargs) == render_conversation(
                turns, ref, **kwargs)


def test_what_only_transformers_interprets_goes_through_transformers(tiny_dir, tmp_path):
    """A Qwen2 class whose file is not Qwen2's pipeline (transformers rebuilds it with Qwen2's),
    a class we do not read ourselves, and a special_tokens_map.json that contradicts the
    config: all loaded by AutoTokenizer, with its ids."""
    data = json.loads(_read(tiny_dir, "tokenizer.json"))
    config = json.loads(_read(tiny_dir, "tokenizer_config.json"))
    data["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    cases = {"other_pipeline": (data, config, None),
             "other_class": (json.loads(_read(tiny_dir, "tokenizer.json")),
                             dict(config, tokenizer_class="GPT2TokenizerFast"), None),
             "contradicting_map": (json.loads(_read(tiny_dir, "tokenizer.json")), config,
                                   {"eos_token": "<|endoftext|>"})}
    for name, (tokenizer_json, tokenizer_config, special_map) in cases.items():
        out = tmp_path / name
        out.mkdir()
        (out / "tokenizer.json").write_text(json.dumps(tokenizer_json))
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        if special_map is not None:
            (out / "special_tokens_map.json").write_text(json.dumps(special_map))
        tok = load_tokenizer(str(out))
        assert tok.engine == "transformers", name
        _assert_same_tokenizer(tok, _reference(str(out)))


def test_direct_read_imports_no_transformers(tiny_dir):
    import subprocess
    import sys

    script = ("import sys\nfrom mindspeed_vita.data.tokenizer import load_tokenizer\n"
              f"tok = load_tokenizer({tiny_dir!r})\nassert tok.encode('hi <image>')\n"
              "print(tok.engine, 'transformers' in sys.modules)\n")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, cwd=repo, env=dict(os.environ, PYTHONPATH=repo))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["tokenizers", "False"]
