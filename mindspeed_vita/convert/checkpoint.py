"""The native checkpoint format: save, load (with tensor-parallel resharding), inspect.

A checkpoint is a directory (format described in docs/checkpoint-format.md)::

    mindspeed_vita.json                       metadata (format version, model config, tp size,
                                              context token ids, dtype, weight files)
    tokenizer/                                HF tokenizer files, Long-VITA tokens included
    model-tp00-of-02.safetensors              tp rank 0: `LongVitaModel.state_dict()` tensors
    model-tp01-of-02.safetensors              tp rank 1

Vision and projector tensors are replicated in every file; language tensors are the rank's
megatron shard (layout in `convert.qwen2_weights`). A checkpoint written at tp=a loads into a
model at tp=b: each language tensor is gathered from the a shards and cut for the b ranks
(`reshard_language_tensor`), which is exactly `native_to_hf_qwen2` followed by
`hf_to_native_qwen2`, one tensor at a time so only one full tensor is ever in memory.
"""
from __future__ import annotations

import abc

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import safe_open

from mindspeed_vita.convert.safetensors_file import save_safetensors
from mindspeed_vita.config.model import LanguageConfig, ModelConfig
from mindspeed_vita.errors import CheckpointError

FORMAT_NAME = "mindspeed-vita-checkpoint"
FORMAT_VERSION = 1
METADATA_FILE = "mindspeed_vita.json"
TOKENIZER_DIR = "tokenizer"
#: the context tokens whose ids the metadata records, in a fixed order
CONTEXT_TOKENS = ("<IMG_CONTEXT>", "<PATCH_CONTEXT>", "<VID_CONTEXT>")

StateDict = Dict[str, torch.Tensor]


def weight_file_name(tp_rank: int, tp_size: int) -> str:
    """File name of tp rank `tp_rank`'s tensors: `model-tp{rank:02d}-of-{tp:02d}.safetensors`."""
    return f"model-tp{tp_rank:02d}-of-{tp_size:02d}.safetensors"


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" / "bfloat16" / "float16" for a torch dtype (the `params_dtype` spelling)."""
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------- metadata
@dataclass
class CheckpointMetadata:
    """The content of `mindspeed_vita.json`."""

    model_config: ModelConfig
    """The configuration the tensors were written for (shapes follow it)."""
    tp_size: int
    """Tensor-parallel size the language shards were written at (one weight file per rank)."""
    dtype: str
    """Dtype of the stored tensors ("float32" | "bfloat16" | "float16")."""
    context_token_ids: Dict[str, int]
    """Ids of `<IMG_CONTEXT>`, `<PATCH_CONTEXT>`, `<VID_CONTEXT>` in the stored tokenizer."""
    hf_source_config: Optional[dict] = None
    """config.json of the HF model this checkpoint was imported from, if any (export keeps
    the fields mindspeed-vita does not model, e.g. bos/eos ids)."""
    hf_generation_config: Optional[dict] = None
    """generation_config.json of the HF model it was imported from, if any (export writes it
    back, with the stop tokens of `mindspeed-vita infer` as eos ids)."""
    format_version: int = FORMAT_VERSION

    @property
    def weight_files(self) -> List[str]:
        """Weight file names, in tp rank order."""
        return [weight_file_name(r, self.tp_size) for r in range(self.tp_size)]

    def to_json(self) -> dict:
        """The JSON object written to `mindspeed_vita.json`."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tp_size": self.tp_size,
            "dtype": self.dtype,
            "context_token_ids": dict(self.context_token_ids),
            "weight_files": self.weight_files,
            "model_config": self.model_config.model_dump(mode="json"),
            "hf_source_config": self.hf_source_config,
            "hf_generation_config": self.hf_generation_config,
        }


def read_metadata(path: str) -> CheckpointMetadata:
    """Read and validate `path/mindspeed_vita.json`; CheckpointError names the file and key."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path!r} is not a mindspeed-vita checkpoint: no {METADATA_FILE}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path}: key 'format' must be {FORMAT_NAME!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format_version={version!r} is not supported "
                              f"(this mindspeed-vita reads version {FORMAT_VERSION})")
    for key in ("tp_size", "dtype", "context_token_ids", "model_config"):
        if key not in raw:
            raise CheckpointError(f"{meta_path}: missing key {key!r}")
    tp_size = raw["tp_size"]
    if not isinstance(tp_size, int) or tp_size < 1:
        raise CheckpointError(f"{meta_path}: key 'tp_size' must be a positive integer, "
                              f"got {tp_size!r}")
    if raw["dtype"] not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{meta_path}: key 'dtype' is {raw['dtype']!r}, expected "
                              f"float32, bfloat16 or float16")
    ids = raw["context_token_ids"]
    if not isinstance(ids, dict) or sorted(ids) != sorted(CONTEXT_TOKENS) or not all(
            isinstance(v, int) for v in ids.values()):
        raise CheckpointError(f"{meta_path}: key 'context_token_ids' must map each of "
                              f"{list(CONTEXT_TOKENS)} to an integer id, got {ids!r}")
    for key in ("hf_source_config", "hf_generation_config"):
        if not isinstance(raw.get(key), (dict, type(None))):
            raise CheckpointError(f"{meta_path}: key {key!r} must be an object or null")
    try:
        model_config = ModelConfig.model_validate(raw["model_config"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{meta_path}: model_config.{where}: {first['msg']}") from exc
    return CheckpointMetadata(model_config=model_config, tp_size=tp_size, dtype=raw["dtype"],
                              context_token_ids=dict(ids),
                              hf_source_config=raw.get("hf_source_config"),
                              hf_generation_config=raw.get("hf_generation_config"),
                              format_version=version)


def context_token_ids_of(tokenizer) -> Dict[str, int]:
    """`{"<IMG_CONTEXT>": id, ...}` of a `VitaTokenizer`."""
    return {"<IMG_CONTEXT>": int(tokenizer.img_context_id),
            "<PATCH_CONTEXT>": int(tokenizer.patch_context_id),
            "<VID_CONTEXT>": int(tokenizer.vid_context_id)}


# ------------------------------------------------------------ resharding (language)
def _language_kind(name: str) -> str:
    """How the native language tensor `name` (no `language.` prefix) is split over tp ranks."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "vocab"
    if name.endswith(("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")):
        return "rows"
    if name.endswith("mlp.linear_fc1.weight"):
        return "gate_up"
    if name.endswith(("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")):
        return "columns"
    if name.endswith("layernorm.weight"):
        return "replicated"
    raise CheckpointError(f"language tensor {name!r} has no known tensor-parallel layout")


def _chunk(tensor: torch.Tensor, parts: int, dim: int, name: str) -> List[torch.Tensor]:
    if tensor.shape[dim] % parts:
        raise CheckpointError(f"tensor {name!r}: dim {dim} of size {tensor.shape[dim]} cannot be "
                              f"split over tp={parts} ranks")
    return list(torch.chunk(tensor, parts, dim=dim))


def reshard_language_tensor(name: str, shards: Sequence[torch.Tensor], cfg: LanguageConfig,
                            tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank `tp_rank`'s slice (of `tp_size`) of the language tensor `name` given its slices
    from every rank of another tp size (`shards`, in rank order).

    Same result as `native_to_hf_qwen2` then `hf_to_native_qwen2`: the vocabulary padding
    (which depends on tp) is dropped and re-added as zero rows, qkv rows stay grouped per kv
    head, and fc1 keeps each rank's `[gate_r; up_r]` order. Raises CheckpointError naming
    the tensor when it cannot be split evenly.
    """
    from mindspeed_vita.models.language import padded_vocab_size

    kind = _language_kind(name)
    if len(shards) == tp_size and kind != "vocab":
        return shards[tp_rank]
    if kind == "replicated":
        return shards[0]
    if kind == "rows":
        return _chunk(torch.cat(list(shards), dim=0), tp_size, 0, name)[tp_rank].clone()
    if kind == "columns":
        return _chunk(torch.cat(list(shards), dim=1), tp_size, 1, name)[tp_rank].clone()
    if kind == "gate_up":
        halves = [_chunk(s, 2, 0, name) for s in shards]
        gate = torch.cat([g for g, _ in halves], dim=0)
        up = torch.cat([u for _, u in halves], dim=0)
        return torch.cat((_chunk(gate, tp_size, 0, name)[tp_rank],
                          _chunk(up, tp_size, 0, name)[tp_rank]), dim=0)
    # vocab: gathered rows = padded vocabulary of the source tp; keep the real rows only
    full = torch.cat(list(shards), dim=0)
    if full.shape[0] < cfg.vocab_size:
        raise CheckpointError(f"tensor {name!r} has {full.shape[0]} vocabulary rows over "
                              f"{len(shards)} tp ranks, fewer than language.vocab_size="
                              f"{cfg.vocab_size}")
    v_pad = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)
    rows = full[: cfg.vocab_size]
    padded = torch.cat((rows, rows.new_zeros(v_pad - cfg.vocab_size, *rows.shape[1:])))
    return _chunk(padded, tp_size, 0, name)[tp_rank].clone()


# ---------------------------------------------------------------- shard sources
class ShardSource(abc.ABC):
    """The tensors of every tp rank of a checkpoint, read one tensor at a time."""

    tp_size: int

    @abc.abstractmethod
    def keys(self, tp_rank: int) -> List[str]:
        """Tensor names stored for `tp_rank`."""

    @abc.abstractmethod
    def get(self, tp_rank: int, name: str) -> torch.Tensor:
        """One tensor of `tp_rank` (CheckpointError naming the file when absent)."""

    @abc.abstractmethod
    def where(self, tp_rank: int) -> str:
        """Where rank `tp_rank`'s tensors come from, for messages."""


class MemoryShards(ShardSource):
    """Shards held in memory, e.g. a full (tp=1) state converted from an HF checkpoint."""

    def __init__(self, shards: Sequence[Mapping[str, torch.Tensor]], label: str):
        self.shards = list(shards)
        self.tp_size = len(self.shards)
        self.label = label

    def keys(self, tp_rank: int) -> List[str]:
        return list(self.shards[tp_rank].keys())

    def get(self, tp_rank: int, name: str) -> torch.Tensor:
        if name not in self.shards[tp_rank]:
            raise CheckpointError(f"{self.where(tp_rank)} has no tensor {name!r}")
        return self.shards[tp_rank][name]

    def where(self, tp_rank: int) -> str:
        return self.label if self.tp_size == 1 else f"{self.label} (tp rank {tp_rank})"


class FileShards(ShardSource, contextlib.AbstractContextManager):
    """The weight files of a native checkpoint directory, opened lazily (safetensors)."""

    def __init__(self, path: str, meta: CheckpointMetadata):
        self.path = path
        self.tp_size = meta.tp_size
        self.files = [os.path.join(path, name) for name in meta.weight_files]
        for file in self.files:
            if not os.path.isfile(file):
                raise CheckpointError(
                    f"checkpoint {path!r} lacks weight file {os.path.basename(file)} "
                    f"(its {METADATA_FILE} says it was written at tp={meta.tp_size})")
        self._stack = contextlib.ExitStack()
        self._handles: Dict[int, Any] = {}

    def _handle(self, tp_rank: int):
        if tp_rank not in self._handles:
            try:
                self._handles[tp_rank] = self._stack.enter_context(
                    safe_open(self.files[tp_rank], framework="pt", device="cpu"))
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read weight file {self.files[tp_rank]}: {exc}") \
                    from exc
        return self._handles[tp_rank]

    def keys(self, tp_rank: int) -> List[str]:
        return list(self._handle(tp_rank).keys())

    def get(self, tp_rank: int, name: str) -> torch.Tensor:
        handle = self._handle(tp_rank)
        if name not in handle.keys():
            raise CheckpointError(f"weight file {self.files[tp_rank]} has no tensor {name!r}")
        return handle.get_tensor(name)

    def where(self, tp_rank: int) -> str:
        return f"weight file {self.files[tp_rank]}"

    def __exit__(self, *exc_info):
        self._stack.close()
        return None


def shard_for_rank(source: ShardSource, cfg: ModelConfig, tp_size: int,
                   tp_rank: int) -> Iterator[Tuple[str, torch.Tensor, str]]:
    """Yield `(name, tensor, where)` of rank `tp_rank` at tp `tp_size`, resharding the language
    tensors of `source` (written for `cfg`) when its tp size differs. `where` names the file the
    tensor came from (for error messages)."""
    if tp_size == source.tp_size:
        for name in source.keys(tp_rank):
            yield name, source.get(tp_rank, name), source.where(tp_rank)
        return
    names = source.keys(0)
    for rank in range(1, source.tp_size):
        _check_same_names(names, source.keys(rank), source, rank)
    for name in names:
        if name.startswith("language."):
            parts = [source.get(r, name) for r in range(source.tp_size)]
            tensor = reshard_language_tensor(name[len("language."):], parts, cfg.language,
                                             tp_size, tp_rank)
        else:
            tensor = source.get(0, name)
        yield name, tensor, source.where(0)


def _check_same_names(reference: List[str], names: List[str], source: ShardSource,
                      rank: int) -> None:
    missing = sorted(set(reference) - set(names))
    extra = sorted(set(names) - set(reference))
    if missing:
        raise CheckpointError(f"{source.where(rank)} has no tensor {missing[0]!r} "
                              f"({source.where(0)} has it)")
    if extra:
        raise CheckpointError(f"{source.where(rank)} holds tensor {extra[0]!r} that "
                              f"{source.where(0)} does not")


def full_state(source: ShardSource, cfg: ModelConfig) -> StateDict:
    """The whole model at tp=1 (language tensors gathered) from any shard source."""
    return {name: tensor for name, tensor, _ in shard_for_rank(source, cfg, 1, 0)}


# ------------------------------------------------------ messages about the config
_SHAPE_KEYS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    (r"vision\.patch_embedding\.weight", ("vision.hidden_size", "vision.patch_size")),
    (r"vision\.position_embedding",
     ("vision.image_size", "vision.patch_size", "vision.hidden_size")),
    (r"vision\.layers\.\d+\.mlp\.fc[12]\.weight|vision\.layers\.\d+\.mlp\.fc1\.bias",
     ("vision.hidden_size", "vision.intermediate_size")),
    (r"vision\..*", ("vision.hidden_size",)),
    (r"projector\.norm\..*", ("vision.hidden_size", "projector.downsample_ratio")),
    (r"projector\.fc1\..*", ("projector.variant", "vision.hidden_size",
                             "projector.downsample_ratio", "language.hidden_size")),
    (r"projector\.fc2\..*", ("projector.variant", "vision.hidden_size", "language.hidden_size")),
    (r"language\.(embedding\.word_embeddings|output_layer)\.weight",
     ("language.vocab_size", "language.make_vocab_size_divisible_by", "language.hidden_size")),
    (r"language\..*linear_qkv\..*", ("language.hidden_size", "language.num_attention_heads",
                                      "language.num_query_groups")),
    (r"language\..*linear_proj\.weight", ("language.hidden_size", "language.num_attention_heads")),
    (r"language\..*linear_fc[12]\.weight", ("language.hidden_size", "language.ffn_hidden_size")),
    (r"language\..*", ("language.hidden_size",)),
)

_PRESENCE_KEYS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    (r"vision\.layers\.\d+\.attn\.qkv\.bias", ("vision.qkv_bias",)),
    (r"vision\.layers\.\d+\..*", ("vision.num_layers",)),
    (r"projector\.fc[12]\.bias", ("projector.variant",)),
    (r"language\.decoder\.layers\.\d+\..*linear_qkv\.bias", ("language.qkv_bias",)),
    (r"language\.decoder\.layers\.\d+\..*", ("language.num_layers",)),
    (r"language\.output_layer\.weight", ("language.tie_word_embeddings",)),
)


def config_keys_for(name: str, *, shape: bool) -> Tuple[str, ...]:
    """The model config keys (dotted, e.g. "vision.hidden_size") that set the shape of the
    native tensor `name` (`shape=True`) or whether it exists at all (`shape=False`)."""
    for pattern, candidates in (_SHAPE_KEYS if shape else _PRESENCE_KEYS):
        if re.fullmatch(pattern, name):
            return candidates
    return ()


def config_value(cfg: ModelConfig, dotted: str):
    """The value of the dotted config key `dotted` ("language.hidden_size") in `cfg`."""
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _explain(name: str, table, model_cfg: ModelConfig, ckpt_cfg: Optional[ModelConfig]) -> str:
    """'language.hidden_size (config 64, checkpoint 32), ...' for the config keys of `name`."""
    keys = config_keys_for(name, shape=table is _SHAPE_KEYS)
    parts = []
    for key in keys:
        mine = config_value(model_cfg, key)
        theirs = None if ckpt_cfg is None else config_value(ckpt_cfg, key)
        if ckpt_cfg is not None and theirs != mine:
            parts.append(f"{key} (config {mine!r}, checkpoint {theirs!r})")
        else:
            parts.append(f"{key}={mine!r}")
    return ", ".join(parts)


# --------------------------------------------------------------------- loading
def load_state_into_model(model: torch.nn.Module, tensors: Iterator[Tuple[str, torch.Tensor, str]],
                          *, ckpt_cfg: Optional[ModelConfig], label: str) -> None:
    """Copy `(name, tensor, where)` triples into `model` (a LongVitaModel), checking that the
    names and shapes match the model exactly; CheckpointError names file, tensor, shapes and
    the config keys that set them. Tensors are cast to the model's dtype."""
    model_cfg: ModelConfig = model.cfg
    expected = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    loaded: StateDict = {}
    origin: Dict[str, str] = {}
    for name, tensor, where in tensors:
        if name not in expected:
            hint = _explain(name, _PRESENCE_KEYS, model_cfg, ckpt_cfg)
            raise CheckpointError(
                f"{where}: tensor {name!r} is not part of the model built from the config"
                + (f" (see {hint})" if hint else ""))
        loaded[name], origin[name] = tensor, where
    # report in the model's order (vision, projector, language), so the first tensor named is
    # the one nearest the input
    wrong = [n for n in expected if n in loaded and loaded[n].shape != expected[n].shape]
    if wrong:
        name = wrong[0]
        raise CheckpointError(
            f"{origin[name]}: tensor {name!r} has shape {tuple(loaded[name].shape)} but the "
            f"model built from the config expects {tuple(expected[name].shape)}; the shape "
            f"follows {_explain(name, _SHAPE_KEYS, model_cfg, ckpt_cfg)}"
            + (f" ({len(wrong) - 1} more tensors disagree)" if len(wrong) > 1 else ""))
    missing = [n for n in expected if n not in loaded]
    if missing:
        hint = _explain(missing[0], _PRESENCE_KEYS, model_cfg, ckpt_cfg)
        raise CheckpointError(
            f"{label} has no tensor {missing[0]!r} that the model built from the config needs"
            + (f" (see {hint})" if hint else "")
            + (f"; {len(missing) - 1} more are missing" if len(missing) > 1 else ""))
    result = model.load_state_dict(loaded, strict=False)
    # megatron's linears report a non-tensor `_extra_state` entry that nothing stores
    leftover = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if leftover or result.unexpected_keys:
        raise CheckpointError(f"{label}: could not load {leftover or result.unexpected_keys}")


def _tp_rank_and_size(model: torch.nn.Module) -> Tuple[int, int]:
    # the model was built with the run's ParallelGroups; its tp split is the one to load into
    return model.groups.tp_rank, model.groups.tp_size


def _check_context_ids(model: torch.nn.Module, meta: CheckpointMetadata, path: str) -> None:
    mine = sorted(model.context_ids)
    theirs = sorted(set(meta.context_token_ids.values()))
    if mine != theirs:
        raise CheckpointError(
            f"checkpoint {path!r} was written with context token ids {meta.context_token_ids} "
            f"but the model was built with {mine}: build it with the checkpoint's tokenizer "
            f"({os.path.join(path, TOKENIZER_DIR)})")


def load_checkpoint(path: str, model: torch.nn.Module) -> CheckpointMetadata:
    """Load the native checkpoint at `path` into `model` (a `LongVitaModel` built under
    its `ParallelGroups`), resharding the language tensors when the checkpoint's tp size
    differs from the model's. Every tp rank calls it; each reads what its shard needs.
    Returns the checkpoint's metadata."""
    meta = read_metadata(path)
    _check_context_ids(model, meta, path)
    tp_rank, tp_size = _tp_rank_and_size(model)
    with FileShards(path, meta) as source:
        tensors = shard_for_rank(source, meta.model_config, tp_size, tp_rank)
        label = (source.where(tp_rank) if tp_size == meta.tp_size else
                 f"checkpoint {path!r} (resharded from tp={meta.tp_size} to tp={tp_size})")
        load_state_into_model(model, tensors, ckpt_cfg=meta.model_config, label=label)
    return meta


def load_full_state_into_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                               cfg: ModelConfig, label: str) -> None:
    """Load a full (tp=1) native state, e.g. converted from HF, into this rank's `model`."""
    tp_rank, tp_size = _tp_rank_and_size(model)
    source = MemoryShards([state], label)
    load_state_into_model(model, shard_for_rank(source, cfg, tp_size, tp_rank), ckpt_cfg=cfg,
                          label=label)


def read_full_state(path: str) -> Tuple[CheckpointMetadata, StateDict]:
    """Metadata and the whole model at tp=1 (language shards gathered) of a native checkpoint."""
    meta = read_metadata(path)
    with FileShards(path, meta) as source:
        return meta, full_state(source, meta.model_config)


# --------------------------------------------------------------------- writing
@dataclass
class NativeModel:
    """A full (tp=1) native state plus what a checkpoint stores beside it."""

    cfg: ModelConfig
    state: StateDict = field(repr=False)
    """`LongVitaModel` tensor names at tp=1."""
    tokenizer: Any = field(repr=False)
    """The `VitaTokenizer` (Long-VITA tokens included)."""
    hf_source_config: Optional[dict] = None
    """config.json of the HF model it came from, if any."""
    hf_generation_config: Optional[dict] = None
    """generation_config.json of the HF model it came from, if any."""


def _stored_config(cfg: ModelConfig) -> ModelConfig:
    # the tokenizer lives inside the checkpoint: a path to another directory would go stale
    return cfg.model_copy(update={"tokenizer": None})


def _to_storable(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _write_weight_file(state: Mapping[str, torch.Tensor], file: str, tp_rank: int,
                       tp_size: int) -> None:
    # clone views: safetensors refuses tensors that share storage
    tensors = {k: _to_storable(v).clone() if v._base is not None else _to_storable(v)
               for k, v in state.items()}
    save_safetensors(tensors, file, metadata={"format": "pt", "tp_rank": str(tp_rank),
                                              "tp_size": str(tp_size)})


def _write_metadata(directory: str, meta: CheckpointMetadata) -> None:
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(meta.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")


def _partial_dir(path: str) -> str:
    return os.path.normpath(path) + ".partial"


def _start_partial(path: str) -> str:
    partial = _partial_dir(path)
    if os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(partial)
    return partial


def _publish(partial: str, path: str) -> None:
    """Move the finished `partial` directory to `path`, replacing an older checkpoint there;
    at every moment either the old or the new checkpoint is complete on disk."""
    path = os.path.normpath(path)
    if os.path.exists(path):
        old = path + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(partial, path)


def check_tp_size(cfg: LanguageConfig, tp_size: int) -> None:
    """CheckpointError naming the config key when the language model cannot be split in
    `tp_size` tensor-parallel shards (`ParallelLayout.check_language`'s rules)."""
    from mindspeed_vita.config.schema import ConfigError
    from mindspeed_vita.parallel.layout import ParallelLayout

    if tp_size < 1:
        raise CheckpointError(f"--tp {tp_size}: the tensor-parallel size must be >= 1")
    try:
        ParallelLayout(tp=tp_size).check_language(cfg, prefix="language", tp_key="--tp")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def write_checkpoint(native: NativeModel, path: str, *, tp_size: int = 1) -> CheckpointMetadata:
    """Write a full (tp=1) native state as a checkpoint sharded for `tp_size` ranks, from one
    process (the converters use this; no process group is needed). Atomic: written to
    `path.partial`, then renamed to `path`."""
    cfg = native.cfg
    check_tp_size(cfg.language, tp_size)
    dtypes = {v.dtype for v in native.state.values()}
    meta = CheckpointMetadata(
        model_config=_stored_config(cfg), tp_size=tp_size,
        dtype=dtype_name(next(iter(dtypes))) if len(dtypes) == 1 else cfg.params_dtype,
        context_token_ids=context_token_ids_of(native.tokenizer),
        hf_source_config=native.hf_source_config,
        hf_generation_config=native.hf_generation_config)
    partial = _start_partial(path)
    source = MemoryShards([native.state], "converted state")
    for rank in range(tp_size):
        shard = {name: t for name, t, _ in shard_for_rank(source, cfg, tp_size, rank)}
        _write_weight_file(shard, os.path.join(partial, weight_file_name(rank, tp_size)), rank,
                           tp_size)
    native.tokenizer.save(os.path.join(partial, TOKENIZER_DIR))
    _write_metadata(partial, meta)
    _publish(partial, path)
    return meta


def save_checkpoint(model: torch.nn.Module, path: str, tokenizer,
                    hf_source_config: Optional[dict] = None,
                    hf_generation_config: Optional[dict] = None) -> None:
    """Save a `LongVitaModel` from every rank of a running job (all ranks must call it).

    Global rank 0 writes the metadata and the tokenizer; the ranks with data-parallel and
    context-parallel rank 0 write their tp rank's weight file; the others only wait. The files
    go to `path.partial` (on a file system every writing rank sees), which rank 0 renames to
    `path` once all are written, so `path` never holds a half-written checkpoint.
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    tp_rank, tp_size = _tp_rank_and_size(model)
    writes_weights = model.groups.dp_rank == 0 and model.groups.cp_rank == 0
    barrier = dist.barrier if dist.is_initialized() else (lambda: None)
    partial = _partial_dir(path)
    if rank == 0:
        _start_partial(path)
    barrier()
    if writes_weights:
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        _write_weight_file(state, os.path.join(partial, weight_file_name(tp_rank, tp_size)),
                           tp_rank, tp_size)
    if rank == 0:
        param_dtypes = {p.dtype for p in model.parameters()}
        dtype = (dtype_name(next(iter(param_dtypes))) if len(param_dtypes) == 1
                 else model.cfg.params_dtype)
        meta = CheckpointMetadata(model_config=_stored_config(model.cfg), tp_size=tp_size,
                                  dtype=dtype, context_token_ids=context_token_ids_of(tokenizer),
                                  hf_source_config=hf_source_config,
                                  hf_generation_config=hf_generation_config)
        tokenizer.save(os.path.join(partial, TOKENIZER_DIR))
        _write_metadata(partial, meta)
    barrier()
    if rank == 0:
        _publish(partial, path)
    barrier()
