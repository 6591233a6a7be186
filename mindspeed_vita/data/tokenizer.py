"""The tokenizer every part of mindspeed-vita uses: a HF (Qwen2-style) tokenizer plus the
Long-VITA special tokens, with the ids the template, the model and the decoder need.

A directory whose `tokenizer.json` is all that decides its ids is read with the `tokenizers`
library directly (no `transformers` import: about a second of every `infer` start-up): a
`tokenizer_class` that loads that file as it is (`PreTrainedTokenizerFast`), or a Qwen2 class
whose file holds exactly Qwen2's pipeline (transformers 5 rebuilds a Qwen2 tokenizer from the
file's vocabulary with its own pipeline; the two agree only then). Every other directory, and
anything a config says that only transformers interprets (a `special_tokens_map.json` that
disagrees, split special tokens, clean-up of decoded spaces, padding baked into the file), goes
through `transformers.AutoTokenizer` as before. Both give the same ids, special tokens and
decoded text (tests/data/test_tokenizer.py compares them on Qwen2-style tokenizers).
"""
from __future__ import annotations

import json
import os
from typing import Dict, FrozenSet, Iterable, List, Optional

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

#: Qwen2's pre-tokenizer split pattern (transformers' `qwen2.tokenization_qwen2`).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: `tokenizer_class` values whose tokenizer is the `tokenizer.json` file as written
_FILE_AS_WRITTEN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
#: `tokenizer_class` values of Qwen2 tokenizers: read directly when the file is Qwen2's pipeline
_QWEN2_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
#: named special tokens: (key, default of a Qwen2 class, default of any other class)
_NAMED_SPECIALS = (("bos_token", None, None), ("eos_token", ENDOFTEXT_TOKEN, None),
                   ("pad_token", ENDOFTEXT_TOKEN, None), ("unk_token", ENDOFTEXT_TOKEN, None))


class TokenizerError(UserInputError):
    """A tokenizer directory that cannot be loaded or lacks a token mindspeed-vita needs."""


class _TokenizersEngine:
    """Encode/decode with a `tokenizers.Tokenizer` read from `tokenizer.json`."""

    kind = "tokenizers"

    def __init__(self, tokenizer, specials: Dict[str, Optional[str]]):
        self.tokenizer = tokenizer
        self.specials = specials

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> Dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens: List[str]) -> None:
        from tokenizers import AddedToken

        self.tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in tokens])


class _TransformersEngine:
    """Encode/decode with a `transformers` tokenizer (`AutoTokenizer`)."""

    kind = "transformers"

    def __init__(self, hf):
        self.hf = hf
        self.specials = {key: getattr(hf, key) for key, _, _ in _NAMED_SPECIALS}

    def encode(self, text: str) -> List[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: List[int], skip_special_tokens: bool) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> Dict[str, int]:
        return self.hf.get_vocab()

    def token_to_id(self, token: str) -> Optional[int]:
        # convert_tokens_to_ids, not get_vocab(): the latter copies all 152K entries per call
        found = self.hf.convert_tokens_to_ids(token)
        unk = self.hf.unk_token_id
        if found is None or (unk is not None and found == unk and token != self.hf.unk_token):
            return None
        return int(found)

    def size(self) -> int:
        return len(self.hf)

    def add_special_tokens(self, tokens: List[str]) -> None:
        from tokenizers import AddedToken

        self.hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in tokens],
                           special_tokens=True)


class VitaTokenizer:
    """A HF tokenizer with the Long-VITA tokens, exposing the ids rendering and decoding use.

    Construct it with `load_tokenizer`. `engine` says what encodes: "tokenizers" (the
    directory's tokenizer.json, read directly) or "transformers" (`AutoTokenizer`); `hf` is the
    equivalent `transformers` tokenizer (loaded on first use when the engine is "tokenizers").
    """

    def __init__(self, engine, path: str):
        self._engine = engine
        self._hf = engine.hf if isinstance(engine, _TransformersEngine) else None
        self.path = path
        self.engine = engine.kind
        vocab = engine.get_vocab()

        def token_id(token: str) -> int:
            if token not in vocab:
                raise TokenizerError(f"tokenizer at {path!r} has no token {token!r}")
            return int(vocab[token])

        def named_id(key: str) -> Optional[int]:
            token = engine.specials.get(key)
            return None if token is None else vocab.get(token)

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
        #: the tokenizer's declared BOS id (None for Qwen2: it has no BOS)
        self.bos_id = named_id("bos_token")
        # Qwen2.5-Instruct names <|im_end|> as eos; a base model names <|endoftext|>.
        eos = named_id("eos_token")
        self.eos_id = int(eos) if eos is not None else self.im_end_id
        pad = named_id("pad_token")
        if pad is None:
            pad = self.endoftext_id if self.endoftext_id is not None else self.eos_id
        self.pad_id = int(pad)
        #: ids whose embedding rows are overwritten by visual features, in no particular order
        self.context_token_ids: FrozenSet[int] = frozenset(
            (self.img_context_id, self.patch_context_id, self.vid_context_id))
        #: ids that end generation: the turn end, the declared eos, the document end
        self.stop_token_ids: FrozenSet[int] = frozenset(
            i for i in (self.im_end_id, self.eos_id, self.endoftext_id) if i is not None)

    @property
    def hf(self):
        """The equivalent `transformers` tokenizer (Long-VITA tokens added): for saving and
        for code that needs transformers' API; importing transformers costs about a second."""
        if self._hf is None:
            self._hf = _load_with_transformers(self.path)
        return self._hf

    def encode(self, text: str) -> List[int]:
        """Token ids of `text`: no BOS/EOS; added tokens in the text map to their single id."""
        return list(self._engine.encode(text))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; with `skip_special_tokens`, ChatML and Long-VITA tokens are dropped."""
        return self._engine.decode([int(i) for i in ids], skip_special_tokens)

    def get_vocab(self) -> Dict[str, int]:
        """Every token and its id (a fresh dict of all entries: not for a per-token loop)."""
        return self._engine.get_vocab()

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a special token such as "<box>"); errors when absent."""
        found = self._engine.token_to_id(token)
        if found is None:
            raise TokenizerError(f"tokenizer at {self.path!r} has no token {token!r}")
        return int(found)

    def save(self, out_dir: str) -> None:
        """Write the tokenizer, Long-VITA tokens included, as a HF tokenizer directory."""
        os.makedirs(out_dir, exist_ok=True)
        self.hf.save_pretrained(out_dir)

    def __len__(self) -> int:
        """Number of ids in use (base vocabulary plus every added token)."""
        return self._engine.size()

    def __repr__(self) -> str:
        return f"VitaTokenizer(path={self.path!r}, size={len(self)})"


def _read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`, or None when the file is absent or not a JSON object."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _token_text(value) -> Optional[str]:
    """A special-token entry of a tokenizer config: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _is_qwen2_pipeline(tokenizer, add_prefix_space: bool) -> bool:
    """True when `tokenizer` (from tokenizer.json) normalises, splits, encodes and decodes as
    transformers' Qwen2 tokenizer does. Offset trimming is left out: it never changes ids."""
    model = tokenizer.model
    if type(model).__name__ != "BPE" or (
            model.dropout, model.unk_token, model.continuing_subword_prefix or "",
            model.end_of_word_suffix or "", model.fuse_unk, model.byte_fallback,
            getattr(model, "ignore_merges", False)) != (None, None, "", "", False, False, False):
        return False

    def state(component) -> Optional[dict]:
        if component is None:
            return None
        data = json.loads(component.__getstate__())
        for entry in [data] + data.get("pretokenizers", []):
            entry.pop("trim_offsets", None)
        return data

    pre = state(tokenizer.pre_tokenizer)
    return (state(tokenizer.normalizer) == {"type": "NFC"}
            and (state(tokenizer.decoder) or {}).get("type") == "ByteLevel"
            and pre == {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PRETOKENIZE_REGEX},
                 "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": add_prefix_space,
                 "use_regex": False}]})


def _load_directly(path: str) -> Optional[_TokenizersEngine]:
    """The tokenizer of `path` read with the `tokenizers` library, or None when only
    transformers can say what it is (see the module docstring)."""
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    file = os.path.join(path, "tokenizer.json")
    if config is None or not os.path.isfile(file):
        return None
    cls = config.get("tokenizer_class")
    if cls not in _FILE_AS_WRITTEN_CLASSES + _QWEN2_CLASSES:
        return None
    if config.get("split_special_tokens") or config.get("clean_up_tokenization_spaces"):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(file)
    except Exception:  # noqa: BLE001 - transformers reports it with its own message
        return None
    if tokenizer.padding is not None:
        return None
    tokenizer.no_truncation()  # transformers encodes without truncation unless asked
    if cls in _QWEN2_CLASSES and not _is_qwen2_pipeline(
            tokenizer, bool(config.get("add_prefix_space") or False)):
        return None
    qwen2 = cls in _QWEN2_CLASSES
    specials = {key: _token_text(config[key]) if key in config else (qwen2_default if qwen2
                                                                      else other_default)
                for key, qwen2_default, other_default in _NAMED_SPECIALS}
    stm = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
    if any(key in stm and _token_text(stm[key]) != specials[key] for key in specials):
        return None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    added = tokenizer.get_added_tokens_decoder()
    # every token the config names must already be in the file as the file has it: otherwise
    # transformers adds or re-flags it, and only it knows how
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        token = added.get(int(index))
        if token is None or token.content != _token_text(entry) or (
                isinstance(entry, dict) and bool(entry.get("special")) != token.special):
            return None
    extra = list(config.get("additional_special_tokens") or []) + list(
        config.get("extra_special_tokens") or []) + list(
        stm.get("additional_special_tokens") or [])
    named = [t for t in specials.values() if t is not None]
    if any(_token_text(t) not in vocab for t in extra + named):
        return None
    return _TokenizersEngine(tokenizer, specials)


def _load_with_transformers(path: str):
    """`transformers.AutoTokenizer` of `path` with the Long-VITA tokens it lacks added."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many types; the message is what matters
        raise TokenizerError(
            f"cannot load a tokenizer from {path!r}: {type(exc).__name__}: {exc}") from exc
    engine = _TransformersEngine(hf)
    _add_missing_special_tokens(engine, path)
    return hf


def _add_missing_special_tokens(engine, path: str) -> None:
    """Check the ChatML frame, then register each Long-VITA token the tokenizer lacks as a
    special (never split) token, in the release's order."""
    vocab = engine.get_vocab()
    absent = [t for t in CHATML_TOKENS if t not in vocab]
    if absent:
        raise TokenizerError(
            f"tokenizer at {path!r} is not a ChatML (Qwen2-style) tokenizer: it lacks {absent}")
    missing = [t for t in LONG_VITA_SPECIAL_TOKENS if t not in vocab]
    if missing:
        engine.add_special_tokens(missing)


def load_tokenizer(path: str) -> VitaTokenizer:
    """Load the HF tokenizer directory `path` and add the Long-VITA tokens it lacks.

    Raises `TokenizerError` naming the directory when it does not exist, cannot be loaded (by
    `tokenizers` or `transformers.AutoTokenizer`), or is not a ChatML (Qwen2-style) tokenizer.
    """
    if not path or not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path!r} does not exist")
    engine = _load_directly(path)
    if engine is not None:
        _add_missing_special_tokens(engine, path)
        return VitaTokenizer(engine, path)
    return VitaTokenizer(_TransformersEngine(_load_with_transformers(path)), path)
