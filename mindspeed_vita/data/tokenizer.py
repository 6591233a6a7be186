"""The tokenizer every part of mindspeed-vita uses: a HF (Qwen2-style) tokenizer plus the
Long-VITA special tokens, with the ids the template, the model and the decoder need."""
from __future__ import annotations

import os
from typing import FrozenSet, Iterable, List

from mindspeed_vita.errors import UserInputError

#: Tokens Long-VITA adds to the Qwen2.5 vocabulary, in the release's order: a tokenizer that
#: has none of them gives them consecutive ids after its base vocabulary (151665..151681 for
#: Qwen2.5), so token ids agree with the released checkpoints. `<image>` and `<video>` are the
#: media tags of user text; as tokens they stay single pieces in every tokenizer we write.
LONG_VITA_SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>",
    "<vid>", "</vid>", "<VID_CONTEXT>",
    "<patch>", "</patch>", "<PATCH_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
    "<image>", "<video>",
)
#: First id of the Long-VITA tokens in a Qwen2.5 tokenizer (151643 BPE ids + 22 specials).
QWEN25_FIRST_ADDED_ID = 151665

#: ChatML frame tokens a tokenizer must already have (Qwen2 tokenizers do).
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

#: Qwen2's end-of-document token; the pad token when the tokenizer names none.
ENDOFTEXT_TOKEN = "<|endoftext|>"


class TokenizerError(UserInputError):
    """A tokenizer directory that cannot be loaded or lacks a token mindspeed-vita needs."""


class VitaTokenizer:
    """A HF tokenizer with the Long-VITA tokens, exposing the ids rendering and decoding use.

    Construct it with `load_tokenizer`. `hf` is the wrapped `transformers` tokenizer.
    """

    def __init__(self, hf, path: str):
        self.hf = hf
        self.path = path
        vocab = hf.get_vocab()

        def token_id(token: str) -> int:
            if token not in vocab:
                raise TokenizerError(f"tokenizer at {path!r} has no token {token!r}")
            return int(vocab[token])

        self.img_start_id = token_id("<img>")
        self.img_end_id = token_id("</img>")
        self.img_context_id = token_id("<IMG_CONTEXT>")
        self.patch_start_id = token_id("<patch>")
        self.patch_end_id = token_id("</patch>")
        self.patch_context_id = token_id("<PATCH_CONTEXT>")
        self.vid_start_id = token_id("<vid>")
        self.vid_end_id = token_id("</vid>")
        self.vid_context_id = token_id("<VID_CONTEXT>")
        self.im_start_id = token_id("<|im_start|>")
        self.im_end_id = token_id("<|im_end|>")
        self.endoftext_id = vocab.get(ENDOFTEXT_TOKEN)
        # Qwen2.5-Instruct names <|im_end|> as eos; a base model names <|endoftext|>.
        eos = hf.eos_token_id
        self.eos_id = int(eos) if eos is not None else self.im_end_id
        pad = hf.pad_token_id
        if pad is None:
            pad = self.endoftext_id if self.endoftext_id is not None else self.eos_id
        self.pad_id = int(pad)
        #: ids whose embedding rows are overwritten by visual features, in no particular order
        self.context_token_ids: FrozenSet[int] = frozenset(
            (self.img_context_id, self.patch_context_id, self.vid_context_id))
        #: ids that end generation: the turn end, the declared eos, the document end
        self.stop_token_ids: FrozenSet[int] = frozenset(
            i for i in (self.im_end_id, self.eos_id, self.endoftext_id) if i is not None)

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`: no BOS/EOS; added tokens in the text map to their single id."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with `skip_special_tokens`, ChatML and Long-VITA tokens are dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a special token such as "<box>"); errors when absent."""
        # convert_tokens_to_ids, not get_vocab(): the latter copies all 152K entries per call
        found = self.hf.convert_tokens_to_ids(token)
        unk = self.hf.unk_token_id
        if found is None or (unk is not None and found == unk and token != self.hf.unk_token):
            raise TokenizerError(f"tokenizer at {self.path!r} has no token {token!r}")
        return int(found)

    def save(self, out_dir: str) -> None:
        """Write the tokenizer, Long-VITA tokens included, as a HF tokenizer directory."""
        os.makedirs(out_dir, exist_ok=True)
        self.hf.save_pretrained(out_dir)

    def __len__(self) -> int:
        """Number of ids in use (base vocabulary plus every added token)."""
        return len(self.hf)

    def __repr__(self) -> str:
        return f"VitaTokenizer(path={self.path!r}, size={len(self)})"


def _add_missing_special_tokens(hf, tokens) -> None:
    """Register each token of `tokens` the tokenizer lacks as a special (never split) token."""
    from tokenizers import AddedToken

    vocab = hf.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                      special_tokens=True)


def load_tokenizer(path: str) -> VitaTokenizer:
    """Load the HF tokenizer directory `path` and add the Long-VITA tokens it lacks.

    Raises `TokenizerError` naming the directory when it does not exist, cannot be loaded by
    `transformers.AutoTokenizer`, or is not a ChatML (Qwen2-style) tokenizer.
    """
    if not path or not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path!r} does not exist")
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; the message is what matters
        raise TokenizerError(
            f"cannot load a tokenizer from {path!r}: {type(exc).__name__}: {exc}") from exc
    vocab = hf.get_vocab()
    absent = [t for t in CHATML_TOKENS if t not in vocab]
    if absent:
        raise TokenizerError(
            f"tokenizer at {path!r} is not a ChatML (Qwen2-style) tokenizer: it lacks {absent}")
    _add_missing_special_tokens(hf, LONG_VITA_SPECIAL_TOKENS)
    return VitaTokenizer(hf, path)
