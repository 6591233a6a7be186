"""How lmms-eval finds the mindspeed-vita model: a `ModelManifest` (entry-point payload)."""
from __future__ import annotations

MODEL_ID = "mindspeed_vita"
CHAT_CLASS_PATH = "mindspeed_vita.eval.lmms_model.MindSpeedVitaLmms"
SIMPLE_CLASS_PATH = "mindspeed_vita.eval.lmms_model.MindSpeedVitaLmmsSimple"
INSTALL_HINT = "lmms-eval is not installed: pip install 'mindspeed-vita[eval]'"


def manifest():
    """The manifest lmms-eval loads from the `lmms_eval.models` entry point group (setup.py):
    model id `mindspeed_vita` (alias `mindspeed-vita`): the chat implementation, and the
    simple one lmms-eval picks with `--force_simple` (loglikelihood tasks)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, chat_class_path=CHAT_CLASS_PATH,
                         simple_class_path=SIMPLE_CLASS_PATH,
                         aliases=("mindspeed-vita",))


def register() -> None:
    """Register the manifest in this process's lmms-eval registry (what the entry point does
    for an installed package; `mindspeed-vita eval` calls it so a source checkout works too)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
