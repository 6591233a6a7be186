"""Token ids agree with the Long-VITA release: the 17 tokens from id 151665, in its order.

A tokenizer the size of Qwen2.5's is built offline: 151,643 byte-level BPE entries (the byte
alphabet plus synthetic pieces) followed by Qwen2.5's 22 special tokens at 151643..151664, in
Qwen2.5's order. `load_tokenizer` must then give the release's tokens the ids the released
checkpoints use, and `<image>` / `<video>` must stay single tokens after a save and reload.
"""
import json
import os

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mindspeed_vita.data.tokenizer import (LONG_VITA_SPECIAL_TOKENS, QWEN25_FIRST_ADDED_ID,
                                           load_tokenizer)

#: the release's order (long_vita/tokenizer.py), written out independently of our constant
RELEASE_ORDER = ["<img>", "</img>", "<IMG_CONTEXT>", "<vid>", "</vid>", "<VID_CONTEXT>",
                 "<patch>", "</patch>", "<PATCH_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                 "<box>", "</box>", "<image>", "<video>"]
QWEN25_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                   "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                   "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                   "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                   "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>"]
QWEN25_BPE_SIZE = 151643


@pytest.fixture(scope="module")
def qwen25_sized(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qwen25_sized"))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    i = 0
    while len(vocab) < QWEN25_BPE_SIZE:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in QWEN25_SPECIALS])
    tokenizer.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None}, f)
    return out


def test_release_order_is_our_order():
    assert list(LONG_VITA_SPECIAL_TOKENS) == RELEASE_ORDER


def test_the_17_tokens_get_the_release_ids(qwen25_sized, tmp_path):
    tok = load_tokenizer(qwen25_sized)
    assert tok.token_to_id("<|endoftext|>") == 151643 and tok.im_end_id == 151645
    ids = [tok.token_to_id(t) for t in RELEASE_ORDER]
    assert QWEN25_FIRST_ADDED_ID == 151665
    assert ids == list(range(151665, 151665 + 17))
    assert (tok.img_context_id, tok.vid_context_id, tok.patch_context_id) == (
        151667, 151670, 151673)
    assert len(tok) == 151682
    # every tokenizer we write keeps them, with the same ids, and the tags stay single tokens
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert [again.token_to_id(t) for t in RELEASE_ORDER] == ids
    for tag in ("<image>", "<video>"):
        assert again.encode(f"a{tag}b") == again.encode("a") + [again.token_to_id(tag)] + \
            again.encode("b")


def test_role_header_is_its_own_piece_as_in_the_release(tmp_path):
    """Content that starts with whitespace tokenises as the release's training code does:
    im_start + ids(role) + ids("\\n") + ids(content) + im_end + ids("\\n"), per turn."""
    from mindspeed_vita.data.template import render_conversation
    from mindspeed_vita.data.types import Message
    from mindspeed_vita.demo.tiny_tokenizer import build_tiny_tokenizer

    tok = load_tokenizer(build_tiny_tokenizer(str(tmp_path / "tok")))
    turns = [("user", "\n\n  Where is the dog?"), ("assistant", " It sleeps\nunder the tree.")]
    ids, labels = render_conversation([Message(r, c) for r, c in turns], tok, image_grids=[],
                                      video_frames=[], tokens_per_tile=4)
    nl = tok.encode("\n")
    expected, learned = [], []
    for role, content in turns:
        header = [tok.im_start_id] + tok.encode(role) + nl
        body = tok.encode(content) + [tok.im_end_id] + nl
        expected += header + body
        learned += [-100] * len(header) + (body if role == "assistant" else [-100] * len(body))
    assert ids == expected and labels == learned
