"""The lmms-eval model `mindspeed_vita`: our inference engine behind lmms-eval's API.

    python -m lmms_eval --model mindspeed_vita \\
        --model_args checkpoint=DIR,max_new_tokens=256,backend=cpu --tasks ...
    torchrun --nproc_per_node 2 -m lmms_eval --model mindspeed_vita \\
        --model_args checkpoint=DIR,cp=2 --tasks ...

Two implementations under one name, as lmms-eval resolves them: `MindSpeedVitaLmms`, the
"chat" model (default: tasks hand it `doc_to_messages`; `generate_until` and
`generate_until_multi_round`), and `MindSpeedVitaLmmsSimple` (`--force_simple`: tasks hand
it a context string and `doc_to_visual`; `generate_until` and `loglikelihood`, which
multiple-choice and perplexity tasks use; lmms-eval builds loglikelihood requests only for
simple models). Both render with our template and tiling and run `eval.runner.EvalRunner`.

Model arguments: `checkpoint` (required: native, HF InternVL or Long-VITA `_HF` directory),
`backend` (auto | npu | cuda | cpu), `cp` / `tp` (model-parallel sizes; launch
cp x tp x replicas processes with torchrun), `max_new_tokens` (when a task sets none, 256),
`max_num_frame` (frames per video, 64), `system_prompt` (none by default, as in training),
`dtype` (override the checkpoint's params dtype, e.g. float32 on CPU), `batch_size` (1).
"""
from __future__ import annotations

import shutil
import tempfile
from functools import partial
from typing import Any, List, Optional, Tuple

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from mindspeed_vita.errors import UserInputError
from mindspeed_vita.eval.messages import chat_to_sample, user_turn


class _MindSpeedVitaBase(lmms):
    """What both implementations share: loading, media files, loglikelihood."""

    def __init__(self, checkpoint: Optional[str] = None, backend: Optional[str] = None,
                 cp: int = 1, tp: int = 1, max_new_tokens: int = 256, max_num_frame: int = 64,
                 system_prompt: Optional[str] = None, dtype: Optional[str] = None,
                 batch_size: int = 1, **_ignored) -> None:
        super().__init__()
        from mindspeed_vita.eval.runner import EvalRunner

        if not checkpoint:
            raise UserInputError("--model_args needs checkpoint=DIR (a native checkpoint or an "
                                 "HF / Long-VITA release directory)")
        if int(batch_size) != 1:
            raise UserInputError(f"batch_size={batch_size}: mindspeed_vita serves one request "
                                 f"at a time (batch_size=1)")
        self.batch_size_per_gpu = 1
        self.default_max_new_tokens = int(max_new_tokens)
        self.runner = EvalRunner(checkpoint, backend=backend, cp=int(cp), tp=int(tp),
                                 dtype=dtype, max_num_frame=int(max_num_frame),
                                 system_prompt=system_prompt)
        self._media_dir = None

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        # lmms-eval's torchrun path gathers request counts in tensors on this device
        return self.runner.device

    # ------------------------------------------------------------ media files
    def _media(self) -> str:
        """This batch's directory for images handed over as PIL objects (one per process)."""
        if self._media_dir is None:
            self._media_dir = tempfile.mkdtemp(prefix="mindspeed_vita_eval_")
        return self._media_dir

    def _generate_all(self, requests: List[Instance], *, kwargs_index: int) -> List[str]:
        """Answers of `requests` through the runner, in order, each cached under (context,
        generation kwargs); `kwargs_index`: where the kwargs sit in this model type's args."""
        answers = self._run_batch([partial(self._generation_job, r.args) for r in requests],
                                  self.runner.generate)
        for request, answer in zip(requests, answers):
            self.cache_hook.add_partial("generate_until",
                                        (request.args[0], request.args[kwargs_index]), answer)
        return answers

    def _run_batch(self, jobs, work) -> list:
        """`self.runner.run(jobs, work)`, removing the batch's media files however it ends."""
        try:
            return self.runner.run(jobs, work)
        finally:
            self._end_batch()

    def _end_batch(self) -> None:
        if self._media_dir is not None:
            shutil.rmtree(self._media_dir, ignore_errors=True)
            self._media_dir = None

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    # ------------------------------------------------------------ loglikelihood
    def _scoring_job(self, args: tuple):
        if len(args) == 2:  # (context, continuation): the unconditional half of acc_mutual_info
            context, continuation = args
            visuals = None
        else:
            context, target, doc_to_visual, doc_id, task, split = args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        sample = chat_to_sample(user_turn(visuals, context), self._media())
        return self.runner.scoring_job(sample, continuation)

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """`(log P(continuation | context), is_greedy)` per request: the context (visuals,
        then the text) as a user turn, the continuation as the assistant's answer."""
        scores = self._run_batch([partial(self._scoring_job, r.args) for r in requests],
                                 self.runner.score)
        for request, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", request.args[:2], score)
        return _through_evaluator(scores)


def _through_evaluator(scores: List[Tuple[float, bool]]) -> list:
    """`scores` in the form that reaches the task's scoring intact. NOTE: lmms-eval 0.7.3's
    evaluator passes every model output through `unwrap_generation_output`, which turns a
    `(float, bool)` pair into its string, and multiple-choice scoring then fails on it; the
    `text` of a `GenerationResult` passes unchanged, so where the pair would be stringified
    it travels in one (checked on the installed lmms-eval, not by version)."""
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    if isinstance(unwrap_generation_output((0.0, True))[0], str):
        return [GenerationResult(text=score) for score in scores]
    return scores


class MindSpeedVitaLmms(_MindSpeedVitaBase):
    """lmms-eval chat model over `EvalRunner` (see module doc for the model arguments)."""

    is_simple = False

    def _generation_job(self, args: tuple):
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        sample = chat_to_sample(doc_to_messages(self._doc(task, split, doc_id)), self._media())
        return self.runner.generation_job(sample, dict(gen_kwargs or {}),
                                          self.default_max_new_tokens)

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """One answer per request, in request order (no batching; errors are raised, never
        turned into empty answers)."""
        return self._generate_all(requests, kwargs_index=2)

    def _rounds(self, args: tuple):
        """The producer of one multi-round request's jobs (lmms-eval's protocol: round 0 is
        `doc_to_messages(doc)`; round k asks `doc_to_messages(doc, round_idx=k,
        previous_output=[answers so far], previous_round_info=...)` for `(messages,
        terminal, previous_output, previous_round_info)` and stops when `terminal`). Each
        round is answered on its own messages, as the task builds them."""
        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        doc = self._doc(task, split, doc_id)
        gen_kwargs = dict(gen_kwargs or {})
        state: dict = {"info": None}

        def produce(outputs: List[str]) -> Optional[Any]:
            if not outputs:
                messages = doc_to_messages(doc)
            else:
                payload = doc_to_messages(doc, round_idx=len(outputs),
                                          previous_output=list(outputs),
                                          previous_round_info=state["info"])
                if not (isinstance(payload, tuple) and len(payload) == 4):
                    return None  # a task without further rounds
                messages, terminal, _, state["info"] = payload
                if terminal:
                    return None
            sample = chat_to_sample(messages, self._media())
            return self.runner.generation_job(sample, gen_kwargs, self.default_max_new_tokens)

        return produce

    def generate_until_multi_round(self, requests: List[Instance]) -> List[List[str]]:
        """The answers of every round of each request (a list per request)."""
        try:
            return self.runner.run_rounds([self._rounds(r.args) for r in requests],
                                          self.runner.generate)
        finally:
            self._end_batch()


class MindSpeedVitaLmmsSimple(_MindSpeedVitaBase):
    """lmms-eval "simple" model (`--force_simple`): context string + `doc_to_visual`."""

    is_simple = True

    def _generation_job(self, args: tuple):
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        doc = self._doc(task, split, doc_id)
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        sample = chat_to_sample(user_turn(visuals, context), self._media())
        return self.runner.generation_job(sample, dict(gen_kwargs or {}),
                                          self.default_max_new_tokens)

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """One answer per request: the visuals, then the context, as one user turn."""
        return self._generate_all(requests, kwargs_index=1)

    def generate_until_multi_round(self, requests) -> List[List[str]]:
        raise UserInputError("mindspeed_vita: multi-round tasks run with the chat model "
                             "(leave out --force_simple)")
