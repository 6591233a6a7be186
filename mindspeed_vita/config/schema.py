"""The stage configuration: model / data / parallel / training / inference / backend sections.

One YAML per stage; the same file runs on NPU, GPU and CPU. Everything is validated here,
before any process group starts: types and unknown keys by pydantic, single-section rules in
each section, cross-section rules in `StageConfig`, the world size in
`StageConfig.check_world_size(world_size)`. Every parallel rule (degrees, TP vs heads, CP vs
sequence length) is `parallel.layout.ParallelLayout`'s; the sections only ask it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from mindspeed_vita.config.base import Section
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.errors import ConfigError

if TYPE_CHECKING:  # imported lazily at run time (parallel/ imports config/)
    from mindspeed_vita.parallel.layout import ParallelLayout


class DataConfig(Section):
    """Data mixture, rendering limits and packing."""

    mixture: Optional[str] = None
    """Mixture YAML (sources with ratio / num / root); relative paths resolve against the stage file."""
    seq_length: int = Field(16384, gt=0)
    """Fixed packed sequence length."""
    packing: Literal["reset", "joint"] = "reset"
    """reset: positions and attention restart per sample (stages 1-2); joint: one continuous
    sequence (stages 3-4)."""
    on_overlong: Literal["drop", "truncate"] = "drop"
    """What happens to a sample longer than seq_length (it is counted either way)."""
    pack_lookahead: int = Field(16, ge=1)
    """Samples the packer may look ahead to fill a row (deterministic best fit)."""
    max_images: int = Field(64, ge=0)
    """Most images in one sample; more is rejected as over_limit."""
    max_frames: int = Field(64, ge=0)
    """Most video frames in one sample; more is rejected as over_limit."""
    max_num_frame: int = Field(64, ge=1)
    """Frames sampled from one video (at most 1 per second)."""
    max_tiles: Optional[int] = Field(None, ge=1)
    """Override of model.max_tiles for this stage."""
    seed: int = 42
    """Seed of the mixture order."""
    num_workers: int = Field(2, ge=0)
    """Loader worker processes (output identical for any value)."""
    prefetch: int = Field(2, ge=1)
    """Batches prepared ahead per worker."""
    strict: bool = False
    """Fail on the first bad sample instead of skipping and counting it."""


class ParallelConfig(Section):
    """Parallel layout: degrees of tensor, pipeline, context and data parallelism."""

    tp: int = Field(1, ge=1)
    """Tensor-parallel degree."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel degree."""
    cp: int = Field(1, ge=1)
    """Context-parallel degree (zigzag ring attention)."""
    dp: int = Field(-1, ge=-1)
    """Data-parallel degree; -1 infers it as world_size / (tp * pp * cp)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism inside the TP group (requires tp > 1)."""
    cp_algo: Literal["ring"] = "ring"
    """Context-parallel algorithm: causal zigzag ring attention with send/recv overlap."""

    @model_validator(mode="after")
    def _check(self):
        # -1 is the config's spelling of "infer"; every other rule lives in ParallelLayout
        if self.dp == 0:
            raise ValueError("dp=0: use -1 to infer it from the world size, or a positive degree")
        from mindspeed_vita.parallel.layout import ParallelLayout

        ParallelLayout.from_config(self, world_size=None)
        return self


class FaultInjection(Section):
    """Deliberate faults that exercise the trainer's recovery paths (tests and drills; megatron's
    error injection plays the same role). Empty by default: nothing is injected."""

    nonfinite_loss_steps: List[int] = []
    """Steps (1-based) whose loss is made NaN on `rank`, forward and backward."""
    nonfinite_grad_steps: List[int] = []
    """Steps whose gradient gets an inf on `rank` after the backward (the loss stays finite)."""
    rank: Optional[int] = Field(None, ge=0)
    """Global rank that injects the faults (None: every rank)."""

    @field_validator("nonfinite_loss_steps", "nonfinite_grad_steps")
    @classmethod
    def _steps_positive(cls, steps: List[int]) -> List[int]:
        if any(step < 1 for step in steps):
            raise ValueError(f"steps are 1-based, got {steps}")
        return steps


class TrainingConfig(Section):
    """Optimisation, freezing, recompute, checkpointing and logging."""

    micro_batch_size: int = Field(1, ge=1)
    """Packed rows per micro batch."""
    global_batch_size: int = Field(8, ge=1)
    """Rows per optimizer step across data-parallel ranks (gradient accumulation fills the rest)."""
    train_iters: int = Field(10, ge=1)
    """Optimizer steps."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(0.0, ge=0)
    """Final learning rate of the decay."""
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    warmup_fraction: float = Field(0.03, ge=0, le=1)
    """Warmup steps as a fraction of train_iters."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 = off)."""
    trainable: List[Literal["vision", "projector", "language"]] = Field(
        ["projector", "language"], min_length=1)
    """Modules that receive gradients; the others are frozen (at least one must train)."""
    vision_lr_mult: float = Field(1.0, gt=0)
    """Learning-rate multiplier of the vision encoder."""
    vision_layer_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise decay of the ViT lr: lr * mult * decay^(num_layers + 1 - layer_id)."""
    recompute: Literal["none", "vision", "full"] = "none"
    """Activation recompute: none, ViT + projector, or every LLM layer (and the ViT)."""
    distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks."""
    seed: int = 42
    """Seed of parameter init and dropout."""
    save: Optional[str] = None
    """Checkpoint directory (None: no checkpoints)."""
    save_interval: int = Field(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Training checkpoints kept in `save` (the oldest are deleted after a new one is complete)."""
    load: Optional[str] = None
    """Weights to start from when `save` holds no checkpoint yet: the previous stage's training
    run directory or training checkpoint, a native checkpoint, or an HF directory. The optimizer,
    scheduler and data position start fresh."""
    max_skipped_in_a_row: int = Field(5, ge=1)
    """Optimizer steps whose loss or gradient norm is NaN/inf are skipped (no update, the model,
    optimizer and schedule stay as they were) and counted; this many in a row stops the run
    after a checkpoint, with exit code 3."""
    fault_injection: FaultInjection = FaultInjection()
    """Faults injected on purpose to exercise the skip / stop paths (off by default)."""
    log_interval: int = Field(1, ge=1)
    """Steps between log lines."""
    metrics_file: Optional[str] = None
    """JSONL file for per-step metrics (default: <save>/metrics.jsonl)."""


class InferenceConfig(Section):
    """Generation settings."""

    max_new_tokens: int = Field(64, ge=1)
    """Tokens to generate at most."""
    greedy: bool = True
    """Argmax decoding; otherwise sample with temperature / top_p."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass."""
    seed: int = 0
    """Sampling seed."""
    system_prompt: Optional[str] = None
    """System message; None = none, as in training."""
    max_num_frame: int = Field(64, ge=1)
    """Frames sampled from one video of a request."""
    decode_mode: Literal["kv-cache", "fixed-length"] = "kv-cache"
    """kv-cache: prefill once (ring attention under CP), keep the keys (sharded over the CP
    ranks) and decode one row per step; fixed-length: the paper's scheme, a full forward of the
    prompt padded to prompt + max_new_tokens for every token (exact, slower)."""
    lm_head: Literal["full", "chunked", "logits-masked"] = "logits-masked"
    """Head used at inference (replaces the checkpoint's model.lm_head): logits-masked projects
    only the predicting row; chunked / full project the prompt and keep that row."""
    max_prompt_tokens: int = Field(131072, ge=1)
    """serve: longest prompt (rendered tokens, visual context included) a request may have."""
    max_images: int = Field(16, ge=0)
    """serve: most images in one request."""
    max_videos: int = Field(2, ge=0)
    """serve: most videos in one request."""
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1)
    """serve: largest request body (inline base64 media included)."""
    request_timeout: float = Field(600.0, gt=0)
    """serve: seconds a request may wait in the queue and generate before it gets a 504."""
    allow_local_media: Optional[str] = None
    """serve: directory whose files requests may name by path (None: inline data: URIs only)."""


class BackendOptions(Section):
    """Backend-specific switches (ignored by backends they do not concern)."""

    use_mindspeed: bool = False
    """On NPU, import MindSpeed's megatron adaptor (MindSpeed installed from source)."""
    attention_impl: Literal["auto", "torch", "flash_attn"] = "auto"
    """On CUDA, the attention kernels: PyTorch's own flash kernels (`torch`) or the flash-attn
    package (`flash_attn`, extra `[gpu]`); `auto` uses flash-attn when it imports."""


class StageConfig(Section):
    """A whole stage: every section plus the backend choice."""

    name: str = "stage"
    """Free-form name used in logs."""
    backend: Literal["auto", "npu", "cuda", "cpu"] = "auto"
    """Hardware backend (the environment variable MINDSPEED_VITA_BACKEND overrides auto)."""
    backend_options: BackendOptions = BackendOptions()
    """Backend-specific switches."""
    model: ModelConfig = ModelConfig()
    """Model architecture."""
    data: DataConfig = DataConfig()
    """Data and packing."""
    parallel: ParallelConfig = ParallelConfig()
    """Parallel layout."""
    training: TrainingConfig = TrainingConfig()
    """Optimisation."""
    inference: InferenceConfig = InferenceConfig()
    """Generation."""

    @model_validator(mode="after")
    def _cross_section(self):
        from mindspeed_vita.parallel.layout import ParallelLayout

        # the parallel rules that need no world size: heads vs tp, row length vs cp (and tp)
        layout = ParallelLayout.from_config(self.parallel, world_size=None)
        layout.check_language(self.model.language)
        layout.check_seq_length(self.data.seq_length)
        if self.training.global_batch_size % self.training.micro_batch_size:
            raise ValueError(
                f"config key 'training.global_batch_size' = {self.training.global_batch_size} is "
                f"not divisible by 'training.micro_batch_size' = {self.training.micro_batch_size}")
        if self.training.min_lr > self.training.lr:
            raise ValueError(
                f"config key 'training.min_lr' = {self.training.min_lr} exceeds 'training.lr' = "
                f"{self.training.lr}")
        return self

    def check_world_size(self, world_size: int) -> "ParallelLayout":
        """The `ParallelLayout` of this stage on `world_size` processes, or ConfigError naming
        the parallel keys; also checks that the global batch covers every data-parallel rank.
        Call it before any process group starts."""
        from mindspeed_vita.parallel.layout import ParallelLayout

        layout = ParallelLayout.from_config(self.parallel, world_size)
        # Every dp rank needs at least one micro batch per step. The global batch need not
        # divide over dp: the paper's 512 / 540 rows on 24 dp ranks (192 devices, TP 8) give
        # some ranks one micro batch more (the loss is the mean over all label tokens anyway).
        per_step = self.training.micro_batch_size * layout.dp
        if self.training.global_batch_size < per_step:
            raise ConfigError(
                f"config key 'training.global_batch_size' = {self.training.global_batch_size} is "
                f"smaller than 'training.micro_batch_size' * dp = {per_step}: every "
                f"data-parallel rank needs at least one micro batch per step")
        return layout
