"""The Long-VITA-14B config builds on the meta device with the published parameter count.

The expected numbers are computed here from the published dimensions of InternViT-300M-448px,
the Long-VITA projector and Qwen2.5-14B-Instruct (docs/long-vita.md, section 1), not from our
model. The 14B build runs in a subprocess whose address space is capped, so a regression that
materialised the weights (~30 GB in bf16) fails with an error instead of exhausting the host.
"""
import json
import math
import os
import resource
import subprocess
import sys

import pytest
import torch
import yaml

from backends import get_backend
from mindspeed_vita.config.model import ModelConfig
from mindspeed_vita.convert.hf_internvl import expected_native_shapes
from mindspeed_vita.models.build import build_meta_model, parameter_counts
from mindspeed_vita.models.vlm import LongVitaModel
from mindspeed_vita.parallel.layout import ParallelLayout
from mindspeed_vita.parallel.process_groups import destroy_parallel, initialize_parallel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the address-space cap of the 14B build: imports need ~3 GB, the bf16 weights would need ~30
ADDRESS_SPACE_LIMIT = 8 * 1024 ** 3


def internvit_300m_params() -> int:
    """InternViT-300M-448px: 24 layers, width 1024, MLP 4096, patch 14, image 448, CLS token,
    learned positions [1, 1025, 1024], fused qkv with bias, ls1/ls2, LayerNorms, no final norm."""
    width, mlp, layers, patch = 1024, 4096, 24, 14
    positions = (448 // patch) ** 2 + 1
    embeddings = (width * 3 * patch * patch + width) + width + positions * width
    layer = ((width * 3 * width + 3 * width) + (width * width + width)  # qkv, proj
             + (width * mlp + mlp) + (mlp * width + width)  # fc1, fc2
             + 2 * width + 2 * 2 * width)  # ls1, ls2, norm1, norm2
    return embeddings + layers * layer


def long_vita_projector_params() -> int:
    """LayerNorm(4096) -> Linear(4096 -> 1024, no bias) -> GELU -> Linear(1024 -> 5120, no bias)."""
    shuffled, vit, llm = 4 * 1024, 1024, 5120
    return 2 * shuffled + shuffled * vit + vit * llm


def qwen25_14b_params() -> int:
    """Qwen2.5-14B: 48 layers, hidden 5120, FFN 13824, 40 query / 8 KV heads of 128, qkv bias,
    RMSNorm, untied embeddings, vocabulary 152064."""
    hidden, ffn, layers, vocab, head_dim, kv_heads = 5120, 13824, 48, 152064, 128, 8
    kv = kv_heads * head_dim
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * ffn + 2 * hidden
    return 2 * vocab * hidden + layers * layer + hidden


def test_analytic_counts_agree_with_the_published_sizes():
    # the model cards: InternViT-300M has 0.3B parameters (304M), Qwen2.5-14B 14.7B
    assert internvit_300m_params() == 304_012_288
    assert qwen25_14b_params() == 14_770_033_664
    assert long_vita_projector_params() == 9_445_376


def run_limited(*argv):
    """`mindspeed-vita ARGV` in a fresh process whose address space is capped."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))

    return subprocess.run([sys.executable, "-m", "mindspeed_vita.cli", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=cap)


def test_14b_config_builds_on_meta_with_the_published_parameter_count():
    r = run_limited("config", "configs/model/long_vita_14b.yaml", "--params", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    counts = json.loads(r.stdout)
    expected = dict(vision=internvit_300m_params(), projector=long_vita_projector_params(),
                    language=qwen25_14b_params())
    expected["total"] = sum(expected.values())
    assert counts == expected  # exact, part by part: 15,083,491,328 in all
    published = 0.304e9 + long_vita_projector_params() + 14.7e9
    assert abs(counts["total"] - published) / published < 0.01


def test_stage_config_params_print_the_same_model():
    r = run_limited("config", "configs/stages/stage4.yaml", "--params")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict((part.strip(), value.strip()) for part, value in
                 (line.split(":", 1) for line in r.stdout.splitlines()))
    assert list(lines) == ["vision", "projector", "language", "total"]
    assert lines["total"] == "15,083,491,328 (15.083 B)"
    assert lines["vision"] == "304,012,288 (0.304 B)"


def test_model_config_overrides_and_errors_name_the_key():
    r = run_limited("config", "configs/model/long_vita_14b.yaml", "language.num_layers=24",
                    "--params", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    per_layer = (qwen25_14b_params() - 2 * 152064 * 5120 - 5120) // 48
    assert json.loads(r.stdout)["language"] == qwen25_14b_params() - 24 * per_layer
    r = run_limited("config", "configs/model/long_vita_14b.yaml", "language.num_layerz=2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown config key 'language.num_layerz'" in r.stderr


@pytest.fixture
def tiny_cfg():
    with open(os.path.join(REPO, "configs", "model", "tiny.yaml")) as f:
        return ModelConfig.model_validate(yaml.safe_load(f))


def test_meta_model_has_the_shapes_of_the_real_model(tiny_cfg):
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        real = LongVitaModel(tiny_cfg, backend, groups=groups, context_token_ids=[5, 6, 7])
        meta = build_meta_model(tiny_cfg, backend, groups=groups)
        # the build leaves megatron's allocations on the host afterwards
        assert torch.cuda.current_device() == torch.device("cpu")
        assert torch.empty(1).device == torch.device("cpu")
    finally:
        destroy_parallel()
    real_state = {k: v for k, v in real.state_dict().items() if isinstance(v, torch.Tensor)}
    meta_state = {k: v for k, v in meta.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sorted(real_state) == sorted(meta_state)
    for name, tensor in real_state.items():
        assert meta_state[name].is_meta, name
        assert (meta_state[name].shape, meta_state[name].dtype) == (tensor.shape, tensor.dtype)
    counts = parameter_counts(meta)
    assert counts == parameter_counts(real)
    assert counts["total"] == counts["vision"] + counts["projector"] + counts["language"]


def test_converter_shape_table_matches_the_model(tiny_cfg):
    # the shapes import/export check against are the ones the model builds, tied or not
    backend = get_backend("cpu")
    groups = initialize_parallel(backend, ParallelLayout())
    try:
        tied = tiny_cfg.language.model_copy(update={"tie_word_embeddings": True,
                                                    "qkv_bias": False})
        for cfg in (tiny_cfg, tiny_cfg.model_copy(update={"language": tied})):
            model = build_meta_model(cfg, backend, groups=groups)
            built = {k: tuple(v.shape) for k, v in model.state_dict().items()
                     if isinstance(v, torch.Tensor)}
            assert expected_native_shapes(cfg) == built
    finally:
        destroy_parallel()


def test_14b_shape_table_has_the_published_parameter_count():
    with open(os.path.join(REPO, "configs", "model", "long_vita_14b.yaml")) as f:
        cfg = ModelConfig.model_validate(yaml.safe_load(f))
    shapes = expected_native_shapes(cfg)
    total = sum(math.prod(shape) for shape in shapes.values())
    assert total == (internvit_300m_params() + long_vita_projector_params()
                     + qwen25_14b_params())
