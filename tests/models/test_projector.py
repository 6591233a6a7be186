"""Pixel shuffle (InternVL v2 order) and the two projector variants, with weight conversion."""
import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLConfig
from transformers.models.internvl.modeling_internvl import (
    InternVLModel, InternVLMultiModalProjector)

from mindspeed_vita.config.model import ModelConfig, ProjectorConfig, VisionConfig
from mindspeed_vita.convert.vision_weights import (
    WeightMappingError, hf_to_native_projector, internvl_mlp1_to_native_projector,
    native_projector_to_internvl_mlp1, native_to_hf_projector)
from mindspeed_vita.models.projector import VisionProjector, pixel_shuffle

VIT, LLM = 16, 24


def shuffle_by_loop(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Explicit definition: token (i, j) concatenates patches (f*i + dy, f*j + dx), dy outer."""
    n, h, w, c = grid.shape
    out = torch.empty(n, (h // factor) * (w // factor), factor * factor * c, dtype=grid.dtype)
    for i in range(h // factor):
        for j in range(w // factor):
            blocks = [grid[:, factor * i + dy, factor * j + dx]
                      for dy in range(factor) for dx in range(factor)]
            out[:, i * (w // factor) + j] = torch.cat(blocks, dim=-1)
    return out


def test_pixel_shuffle_known_values():
    grid = torch.arange(16.0).reshape(1, 4, 4, 1)  # value = 4 * row + col
    expected = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15.0]])
    assert torch.equal(pixel_shuffle(grid, 0.5)[0], expected)
    assert torch.equal(pixel_shuffle(grid.reshape(1, 16, 1), 0.5)[0], expected)


@pytest.mark.parametrize("shape,ratio", [((2, 4, 4, 3), 0.5), ((2, 4, 6, 5), 0.5),
                                         ((1, 6, 4, 2), 0.5), ((2, 6, 9, 2), 1 / 3),
                                         ((1, 3, 3, 4), 1.0)])
def test_pixel_shuffle_matches_explicit_loop(shape, ratio):
    grid = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    assert torch.equal(pixel_shuffle(grid, ratio), shuffle_by_loop(grid, round(1 / ratio)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 6), (3, 4, 6, 2)])
def test_pixel_shuffle_matches_hf_internvl(shape):
    grid = torch.randn(shape)
    hf = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)  # does not use self
    assert torch.equal(pixel_shuffle(grid, 0.5), hf.reshape(shape[0], -1, hf.shape[-1]))


def test_pixel_shuffle_rejects_bad_input():
    with pytest.raises(ValueError, match="downsample_ratio=0.3"):
        pixel_shuffle(torch.zeros(1, 16, 2), 0.3)
    with pytest.raises(ValueError, match="15 patches do not form a square"):
        pixel_shuffle(torch.zeros(1, 15, 2), 0.5)
    with pytest.raises(ValueError, match="3x4 patch grid"):
        pixel_shuffle(torch.zeros(1, 3, 4, 2), 0.5)
    with pytest.raises(ValueError, match=r"\[n, h\*w, c\]"):
        pixel_shuffle(torch.zeros(16, 2), 0.5)


def test_long_vita_variant_is_a_bias_free_vit_width_bottleneck():
    projector = VisionProjector(ProjectorConfig(variant="long-vita"), VIT, LLM)
    shapes = {name: tuple(p.shape) for name, p in projector.named_parameters()}
    assert shapes == {"norm.weight": (4 * VIT,), "norm.bias": (4 * VIT,),
                      "fc1.weight": (VIT, 4 * VIT), "fc2.weight": (LLM, VIT)}
    assert projector.fc1.bias is None and projector.fc2.bias is None
    with torch.no_grad():
        for p in projector.parameters():
            p.normal_()
    features = torch.randn(3, 64, VIT)
    got = projector(features)
    assert got.shape == (3, 16, LLM)
    shuffled = shuffle_by_loop(features.reshape(3, 8, 8, VIT), 2)
    normed = F.layer_norm(shuffled, (4 * VIT,), projector.norm.weight, projector.norm.bias, 1e-5)
    expected = F.gelu(normed @ projector.fc1.weight.T) @ projector.fc2.weight.T
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid_hw", [None, (4, 6)])
def test_recompute_gives_same_output_and_grads_and_saves_nothing(grid_hw):
    """recompute=True: the same output and gradients (bit-identical), nothing but the input saved
    for backward, and the norm runs again in backward."""
    from mindspeed_vita.bench.common import saved_tensor_bytes

    n_patches = 64 if grid_hw is None else 24
    features = torch.randn(3, n_patches, VIT, generator=torch.Generator().manual_seed(1))
    plain = VisionProjector(ProjectorConfig(), VIT, LLM)
    recomputed = VisionProjector(ProjectorConfig(), VIT, LLM, recompute=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
    recomputed.load_state_dict(plain.state_dict())
    results = {}
    for name, projector in (("plain", plain), ("recomputed", recomputed)):
        calls = [0]
        projector.norm.register_forward_pre_hook(lambda m, i: calls.__setitem__(0, calls[0] + 1))
        x = features.clone().requires_grad_()
        out = projector(x, grid_hw)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        saved = saved_tensor_bytes(lambda: projector(x, grid_hw))
        results[name] = (out.detach(), x.grad, {n: p.grad for n, p in projector.named_parameters()},
                         calls[0], saved)
    (out, dx, grads, calls, saved), (out_rc, dx_rc, grads_rc, calls_rc, saved_rc) = (
        results["plain"], results["recomputed"])
    assert torch.equal(out, out_rc) and torch.equal(dx, dx_rc)
    assert all(torch.equal(grads[n], grads_rc[n]) for n in grads)
    assert (calls, calls_rc) == (2, 3)  # plain: two forwards; recomputed: + one recompute
    assert saved > 3 * features.numel() * 4  # input, shuffled, normed, fc1 and GELU outputs
    assert saved_rc == features.numel() * 4  # the input only


def hf_projector(seed: int) -> InternVLMultiModalProjector:
    config = InternVLConfig(
        vision_config=dict(hidden_size=VIT, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, image_size=56, patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=LLM, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                         vocab_size=64),
        image_token_id=63, downsample_ratio=0.5)
    module = InternVLMultiModalProjector(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return module


@torch.no_grad()
def test_internvl_variant_matches_hf_projector():
    hf = hf_projector(seed=0)
    projector = VisionProjector(ProjectorConfig(variant="internvl"), VIT, LLM)
    projector.load_state_dict(hf_to_native_projector(hf.state_dict(), prefix=""))
    assert projector.fc1.bias is not None and projector.fc2.bias is not None
    features = torch.randn(2, 36, VIT)
    expected = hf(pixel_shuffle(features, 0.5))
    assert (projector(features) - expected).abs().max().item() <= 1e-5


def test_non_square_grid_needs_grid_hw():
    projector = VisionProjector(ProjectorConfig(), VIT, LLM)
    features = torch.randn(2, 4 * 6, VIT)
    with torch.no_grad():
        got = projector(features, grid_hw=(4, 6))
        expected = projector.fc2(F.gelu(projector.fc1(projector.norm(
            shuffle_by_loop(features.reshape(2, 4, 6, VIT), 2)))))
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="grid_hw=.5, 5. does not match 24 patches"):
        projector(features, grid_hw=(5, 5))
    with pytest.raises(ValueError, match=r"\[n, patches, 16\]"):
        projector(torch.randn(2, 16, VIT + 1))


def test_output_count_is_model_config_tokens_per_tile():
    config = ModelConfig(vision=VisionConfig(image_size=112, hidden_size=VIT, num_heads=2))
    projector = VisionProjector(config.projector, VIT, LLM)
    patches = (112 // 14) ** 2
    assert projector(torch.randn(1, patches, VIT)).shape[1] == config.tokens_per_tile == 16


@pytest.mark.parametrize("variant", ["long-vita", "internvl"])
def test_projector_conversions_round_trip_bit_exact(variant):
    projector = VisionProjector(ProjectorConfig(variant=variant), VIT, LLM).to(torch.bfloat16)
    native = projector.state_dict()
    hf = native_to_hf_projector(native)
    assert set(hf) == {f"model.multi_modal_projector.{m}.{p}" for m, p in (
        ("layer_norm", "weight"), ("layer_norm", "bias"), ("linear_1", "weight"),
        ("linear_2", "weight"))} | ({"model.multi_modal_projector.linear_1.bias",
                                     "model.multi_modal_projector.linear_2.bias"}
                                    if variant == "internvl" else set())
    mlp1 = native_projector_to_internvl_mlp1(native)
    assert {k.rsplit(".", 1)[0] for k in mlp1} == {"mlp1.0", "mlp1.1", "mlp1.3"}
    for back in (hf_to_native_projector(hf), internvl_mlp1_to_native_projector(mlp1)):
        assert sorted(back) == sorted(native)
        for key, tensor in native.items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


def test_projector_converter_errors_name_the_key():
    with pytest.raises(WeightMappingError, match="model.multi_modal_projector.linear_3.weight"):
        hf_to_native_projector({"model.multi_modal_projector.linear_3.weight": torch.zeros(1)})
    with pytest.raises(WeightMappingError, match="mlp1.2.weight"):
        internvl_mlp1_to_native_projector({"mlp1.2.weight": torch.zeros(1)})
    with pytest.raises(WeightMappingError, match="no HF InternVL projector weights"):
        hf_to_native_projector({"mlp1.0.weight": torch.zeros(1)})
