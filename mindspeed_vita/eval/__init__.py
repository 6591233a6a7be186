"""Evaluation through lmms-eval (optional extra `mindspeed-vita[eval]`).

`lmms_model.MindSpeedVitaLmms` is an lmms-eval "chat" model running our inference engine on a
native checkpoint or an HF / Long-VITA release directory; `registration.manifest` registers
it under the name `mindspeed_vita` (setup.py's `lmms_eval.models` entry point), so
`python -m lmms_eval --model mindspeed_vita --model_args checkpoint=DIR` finds it;
`mindspeed-vita eval` is a thin entry that registers it and runs lmms-eval. Nothing here is
imported unless an evaluation runs, and the rest of mindspeed-vita works without lmms-eval.
"""
