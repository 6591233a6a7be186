"""A tiny Qwen2-like byte-level BPE tokenizer, built offline, for tests and the demo.

Real runs point `model.tokenizer` at a Qwen2.5 directory. Tests and the demo need something
that loads through `transformers.AutoTokenizer` exactly like Qwen2.5 (same pre-tokenizer regex,
same NFC normaliser, same byte-level alphabet, same special tokens, ChatML template) but has a
vocabulary small enough for a toy embedding table. It is trained here, deterministically, on a
small English corpus written for this purpose.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

from mindspeed_vita.data.tokenizer import LONG_VITA_SPECIAL_TOKENS, QWEN2_PRETOKENIZE_REGEX

#: The special tokens of a Qwen2 tokenizer, in Qwen2's id order (after the BPE vocabulary).
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

#: ChatML, with no default system message (Long-VITA trains without one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS_PARAGRAPHS = (
    "The camera looks at a small red house near the river. Two children are playing in the "
    "garden, and a brown dog is sleeping under the old tree.",
    "Describe the image in detail. What is happening in the video? How many people can you "
    "see, and what are they doing?",
    "A long video is a sequence of frames. The model reads every frame, turns it into tokens, "
    "and then answers questions about the whole story.",
    "The picture shows a city street at night. Cars wait at the traffic light while people "
    "cross the road with umbrellas in the rain.",
    "In the first scene, a woman opens the door and walks into the kitchen. She puts a cup of "
    "tea on the table and reads a letter.",
    "The chart has three columns. The first column is the year, the second is the price, and "
    "the third is the number of items sold.",
    "Question: what colour is the car on the left? Answer: the car on the left is blue, and "
    "the one on the right is white.",
    "Summarise the movie in a few sentences. The hero leaves his village, meets a wise old "
    "teacher, learns to fight, and returns home to save his family.",
    "Read the text in the document and list the important dates. The meeting starts at 9:30 "
    "on Monday, 12 May 2025, and ends at 17:00.",
    "A comic book tells a story with pictures and short words. Each page has several panels, "
    "and the reader follows them from left to right.",
    "The user asks a question and the assistant gives a helpful, honest and short answer. If "
    "the assistant is not sure, it says so.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 448 512 1024 4096.",
    "Math: if x + 3 = 7, then x = 4. The sum of 2 and 5 is 7, and 6 times 7 is 42.",
    "The weather today is sunny with a light wind from the west. Tomorrow there will be clouds "
    "and maybe some snow in the mountains.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Training a large model takes many devices. The data is split into batches, the loss is "
    "computed for every token of the answer, and the weights are updated step by step.",
    "She said: \"I can't see the boat, but I'm sure it's there.\" They'd never been so far "
    "from the coast, and we'll remember that day.",
    "Look at the first image, then at the second image. What changed between them? The lamp "
    "moved from the desk to the floor.",
)


def _corpus() -> Iterator[str]:
    """The training text, in a fixed order (training is deterministic given the order)."""
    yield from _CORPUS_PARAGRAPHS


def _build_unfit_tokenizer() -> Tokenizer:
    """A byte-level BPE pipeline identical to Qwen2's, with an empty vocabulary."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _tokenizer_config() -> dict:
    """tokenizer_config.json with Qwen2.5-Instruct's conventions (eos <|im_end|>, pad
    <|endoftext|>, no BOS) and the ChatML template."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "unk_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 1_310_720,
        "split_special_tokens": False,
    }


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 1000) -> str:
    """Train and save a tiny Qwen2-like tokenizer to `out_dir`; returns `out_dir`.

    The directory loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` and with
    `mindspeed_vita.data.tokenizer.load_tokenizer(out_dir)`. Its total size, including the Qwen2
    special tokens and the Long-VITA tokens `load_tokenizer` adds, stays below `vocab_size`, so
    a model with `vocab_size` embedding rows covers every id. Building twice gives
    byte-identical files; no network is used.
    """
    reserved = len(QWEN2_SPECIAL_TOKENS) + len(LONG_VITA_SPECIAL_TOKENS) + 1
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size - reserved <= len(byte_alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the byte alphabet needs {len(byte_alphabet)} "
            f"ids and {reserved} more are reserved for special tokens")
    tokenizer = _build_unfit_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - reserved,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        # sorted so the initial ids do not depend on set iteration order
        initial_alphabet=sorted(byte_alphabet),
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # added after training so they sit after the BPE vocabulary, as in Qwen2
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False,
                   single_word=False)
        for token in QWEN2_SPECIAL_TOKENS])

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(), f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return out_dir

