"""The lmms-eval "chat" model `mindspeed_vita`: our inference engine behind lmms-eval's API.

    python -m lmms_eval --model mindspeed_vita \\
        --model_args checkpoint=DIR,max_new_tokens=256,backend=cpu --tasks ...

`checkpoint` is a native checkpoint, an HF InternVL directory or a Long-VITA release `_HF`
directory (anything `mindspeed-vita infer` loads). Requests are served one at a time through
`inference.engine.Generator` (render with our template and tiling, prefill, KV-cache decode):
the task's `doc_to_messages` output is turned into a request (`eval.messages`), generation
kwargs map to our sampling (temperature 0: greedy) and `until` strings end the answer.
Model arguments: `checkpoint` (required), `backend` (auto | npu | cuda | cpu),
`max_new_tokens` (default when a task sets none, 256), `max_num_frame` (frames per video, 64),
`system_prompt` (none by default, as in training), `dtype` (override the checkpoint's params
dtype, e.g. float32 on CPU), `batch_size` (must be 1).
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from typing import List, Optional, Tuple

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from mindspeed_vita.eval.messages import chat_to_sample, cut_at_stop, sampling_from_gen_kwargs
from mindspeed_vita.errors import UserInputError


class MindSpeedVitaLmms(lmms):
    """lmms-eval chat model over `Generator` (see module doc for the model arguments)."""

    is_simple = False

    def __init__(self, checkpoint: Optional[str] = None, backend: Optional[str] = None,
                 max_new_tokens: int = 256, max_num_frame: int = 64,
                 system_prompt: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size: int = 1, **_ignored) -> None:
        super().__init__()
        from backends import get_backend
        from mindspeed_vita.config.schema import ParallelConfig
        from mindspeed_vita.inference.engine import Generator
        from mindspeed_vita.models.build import load_pretrained
        from mindspeed_vita.parallel.layout import ParallelLayout
        from mindspeed_vita.parallel.process_groups import (destroy_parallel, initialize_parallel,
                                                            launch_world_size)

        if not checkpoint:
            raise UserInputError("--model_args needs checkpoint=DIR (a native checkpoint or an "
                                 "HF / Long-VITA release directory)")
        if int(batch_size) != 1:
            raise UserInputError(f"batch_size={batch_size}: mindspeed_vita serves one request "
                                 f"at a time (batch_size=1)")
        self.batch_size_per_gpu = 1
        self.default_max_new_tokens = int(max_new_tokens)
        device_backend = get_backend(backend)
        # the default parallel section, as `infer`: no model split
        layout = ParallelLayout.from_config(ParallelConfig(), launch_world_size())
        groups = initialize_parallel(device_backend, layout)
        update = {"params_dtype": dtype} if dtype else None
        try:
            model, tokenizer, _ = load_pretrained(checkpoint, device_backend, groups=groups,
                                                  config_update=update)
        except BaseException:
            destroy_parallel()
            raise
        model.eval()
        self.generator = Generator(model, tokenizer, max_num_frame=int(max_num_frame),
                                   system_prompt=system_prompt)
        self.tokenizer = tokenizer
        self._media_dir = tempfile.mkdtemp(prefix="mindspeed_vita_eval_")
        # the images of the last batch are removed when the evaluation process ends
        atexit.register(lambda: shutil.rmtree(self._media_dir, ignore_errors=True))

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def answer(self, messages, gen_kwargs: dict) -> str:
        """The model's answer to one conversation (lmms-eval messages) under `gen_kwargs`."""
        sample = chat_to_sample(messages, self._media_dir)
        max_new, sampling, stops = sampling_from_gen_kwargs(gen_kwargs,
                                                            self.default_max_new_tokens)
        input_ids, pixels = self.generator.render(sample)
        produced: List[int] = []

        def stop_here(token_id: int) -> bool:
            produced.append(token_id)
            return bool(stops) and any(s in self.tokenizer.decode(produced,
                                                                  skip_special_tokens=True)
                                       for s in stops)

        result = self.generator.generate_ids(input_ids, pixels, max_new, sampling,
                                             seed=int(gen_kwargs.get("seed", 0) or 0),
                                             on_token=stop_here)
        return cut_at_stop(result.text, stops)

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """One answer per request, in request order (no batching; errors are raised, never
        turned into empty answers)."""
        answers = []
        for request in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            answer = self.answer(doc_to_messages(doc), dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (request.args[0], gen_kwargs), answer)
            answers.append(answer)
        shutil.rmtree(self._media_dir, ignore_errors=True)
        self._media_dir = tempfile.mkdtemp(prefix="mindspeed_vita_eval_")
        return answers

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        raise NotImplementedError("mindspeed_vita answers generate_until tasks only "
                                  "(loglikelihood tasks are not supported yet)")

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("mindspeed_vita does not support multi-round tasks yet")
