"""The engine behind the lmms-eval models: a checkpoint loaded for inference, requests turned
into jobs, jobs executed (generation, or the log-likelihood of a continuation).

One process, or under torchrun a context-parallel (and/or tensor-parallel) model: `cp` x `tp`
ranks form a block that executes every job together (`eval.exchange.BlockExchange`); the rest
of the world is data parallel, each block a replica with its own share of the requests.
Nothing here imports lmms-eval.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from mindspeed_vita.data.types import Sample
from mindspeed_vita.errors import UserInputError
from mindspeed_vita.eval.exchange import BlockExchange
from mindspeed_vita.eval.messages import cut_at_stop, sampling_from_gen_kwargs
from mindspeed_vita.inference.sampling import SamplingParams


@dataclass
class GenerationJob:
    """One rendered request to answer (what a block's owner broadcasts)."""

    input_ids: torch.Tensor  # [1, s]
    pixel_values: Optional[torch.Tensor]
    max_new_tokens: int
    sampling: SamplingParams
    stops: List[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class ScoringJob:
    """One rendered context and the token ids of the continuation to score."""

    input_ids: torch.Tensor  # [1, s]
    pixel_values: Optional[torch.Tensor]
    continuation_ids: List[int]


class EvalRunner:
    """A checkpoint loaded for evaluation (see module doc); `close()` ends its process groups.
    """

    def __init__(self, checkpoint: str, *, backend: Optional[str] = None, cp: int = 1,
                 tp: int = 1, dtype: Optional[str] = None, max_num_frame: int = 64,
                 system_prompt: Optional[str] = None) -> None:
        from backends import get_backend
        from mindspeed_vita.config.schema import ParallelConfig
        from mindspeed_vita.inference.engine import Generator
        from mindspeed_vita.models.build import load_pretrained
        from mindspeed_vita.parallel.layout import ParallelLayout
        from mindspeed_vita.parallel.process_groups import (destroy_parallel, initialize_parallel,
                                                            launch_world_size)

        # the rest of the world (WORLD_SIZE / (cp * tp)) is data parallel
        layout = ParallelLayout.from_config(ParallelConfig(cp=int(cp), tp=int(tp)),
                                            launch_world_size())
        self.backend = get_backend(backend)
        groups = initialize_parallel(self.backend, layout)
        update: Dict[str, Any] = {"params_dtype": dtype} if dtype else {}
        try:
            model, tokenizer, _ = load_pretrained(checkpoint, self.backend, groups=groups,
                                                  config_update=update or None)
            self.exchange = BlockExchange.for_model(groups)
        except BaseException:
            destroy_parallel()
            raise
        model.eval()
        self.groups = groups
        self.generator = Generator(model, tokenizer, max_num_frame=int(max_num_frame),
                                   system_prompt=system_prompt)
        self.tokenizer = tokenizer
        print(f"[mindspeed_vita eval] rank {groups.rank}: model block cp={groups.cp_size} "
              f"tp={groups.tp_size}, {groups.dp_size} data-parallel replica(s)",
              file=sys.stderr, flush=True)

    @property
    def device(self) -> torch.device:
        return self.backend.device()

    def close(self) -> None:
        """End the process groups (the model is unusable afterwards)."""
        from mindspeed_vita.parallel.process_groups import destroy_parallel

        destroy_parallel()

    # ---------------------------------------------------------------- jobs
    def generation_job(self, sample: Sample, gen_kwargs: Dict[str, Any],
                       default_max_new_tokens: int) -> GenerationJob:
        """Render `sample` with the generation prompt; sampling from lmms-eval's kwargs."""
        max_new, sampling, stops = sampling_from_gen_kwargs(gen_kwargs, default_max_new_tokens)
        input_ids, pixels = self.generator.render(sample)
        return GenerationJob(input_ids, pixels, max_new, sampling, stops,
                             seed=int(gen_kwargs.get("seed", 0) or 0))

    def scoring_job(self, sample: Sample, continuation: str) -> ScoringJob:
        """Render `sample` (the context) with the generation prompt; the continuation is
        tokenized on its own, as an assistant turn's content is in training."""
        if not isinstance(continuation, str):
            raise UserInputError(f"a loglikelihood continuation must be text, got "
                                 f"{type(continuation).__name__} {continuation!r}")
        input_ids, pixels = self.generator.render(sample)
        return ScoringJob(input_ids, pixels, self.tokenizer.encode(continuation))

    def run(self, makers, execute) -> List[Any]:
        """`execute` (`generate` / `score`) the jobs of `makers` on the model's block."""
        return self.exchange.run(makers, execute)

    def run_rounds(self, producers, execute) -> List[List[Any]]:
        """Multi-round variant of `run` (`BlockExchange.run_rounds`)."""
        return self.exchange.run_rounds(producers, execute)

    # ---------------------------------------------------------------- execution
    def generate(self, job: GenerationJob) -> str:
        """The answer to `job`, cut at the first stop string (the same on every block rank)."""
        produced: List[int] = []

        def stop_here(token_id: int) -> bool:
            produced.append(token_id)
            return bool(job.stops) and any(
                s in self.tokenizer.decode(produced, skip_special_tokens=True)
                for s in job.stops)

        result = self.generator.generate_ids(job.input_ids, job.pixel_values,
                                             job.max_new_tokens, job.sampling, seed=job.seed,
                                             on_token=stop_here)
        return cut_at_stop(result.text, job.stops)

    @torch.no_grad()
    def score(self, job: ScoringJob) -> Tuple[float, bool]:
        """`(log P(continuation | context), is_greedy)`: the sum of the continuation tokens'
        log-probabilities (log-softmax of the fp32 logits), and whether greedy generation would
        have produced exactly those tokens (the argmax with the visual tokens banned, as
        `Generator` chooses). The context is prefilled once; each continuation token is then
        fed to the KV cache (sharded under CP), teacher-forced."""
        from mindspeed_vita.inference.decoding import make_decoding

        cont = job.continuation_ids
        if not cont:
            return 0.0, True
        model = self.generator.model
        device = self.device
        pixels = job.pixel_values
        if pixels is not None:
            pixels = pixels.to(device) if pixels.numel() else None
        decoding = make_decoding(self.generator.decode_mode, model, job.input_ids, pixels,
                                 len(cont))
        prompt_len = int(job.input_ids.shape[1])
        banned = self.generator.banned_ids
        logits = decoding.prefill()
        total, greedy = 0.0, True
        for index, token in enumerate(cont):
            row = logits[0].float()
            total += float(torch.log_softmax(row, dim=-1)[token])
            greedy = greedy and int(row.index_fill(0, banned, float("-inf")).argmax()) == token
            if index + 1 < len(cont):
                logits = decoding.step(torch.tensor([token], device=device), prompt_len + index)
        return total, greedy
