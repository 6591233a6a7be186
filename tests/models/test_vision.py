"""InternViT: parity with the transformers InternVL port, position interpolation against a plain
bicubic implementation, chunking, recompute, backend wiring and weight-name conversion."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import InternVLConfig, InternVLForConditionalGeneration

from backends.base import Backend, default_scale
from mindspeed_vita.config.model import ProjectorConfig, VisionConfig
from mindspeed_vita.convert.vision_weights import (
    WeightMappingError, hf_internvit_to_native, hf_to_native_projector, hf_to_native_vision,
    native_to_hf_internvit, native_to_hf_vision)
from mindspeed_vita.models.projector import VisionProjector
from mindspeed_vita.models.vision import InternViT

WIDTH, LAYERS, HEADS, MLP, IMAGE, PATCH = 64, 2, 4, 128, 112, 14
LLM_HIDDEN = 48
PARITY_ATOL = 1e-5


def tiny_vision_config(**overrides) -> VisionConfig:
    values = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_layers=LAYERS,
                  num_heads=HEADS, intermediate_size=MLP, layer_norm_eps=1e-6, qkv_bias=True)
    values.update(overrides)
    return VisionConfig(**values)


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (HF zero-inits CLS/positions and sets layer scale constant);
    layer scales and norm weights stay positive and far from 1 so they visibly matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("lambda_1", "lambda_2", "attn_scale", "mlp_scale")):
                param.copy_(0.2 + 0.6 * torch.rand(param.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def hf_model():
    side = IMAGE // PATCH
    config = InternVLConfig(
        vision_config=dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH,
                           attention_bias=True, layer_scale_init_value=0.5),
        text_config=dict(model_type="qwen2", hidden_size=LLM_HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                         vocab_size=256),
        image_token_id=255, image_seq_length=(side // 2) ** 2, downsample_ratio=0.5)
    model = InternVLForConditionalGeneration(config).eval()
    randomize_(model.model.vision_tower, seed=1)
    randomize_(model.model.multi_modal_projector, seed=2)
    return model


def native_from_hf(hf_model, **vision_overrides):
    state = hf_model.state_dict()
    vit = InternViT(tiny_vision_config(**vision_overrides)).eval()
    vit.load_state_dict(hf_to_native_vision(state))
    projector = VisionProjector(ProjectorConfig(variant="internvl"), WIDTH, LLM_HIDDEN).eval()
    projector.load_state_dict(hf_to_native_projector(state))
    return vit, projector


def pixels(n, height, width=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, height, width or height, generator=gen)


# ------------------------------------------------------------------------ HF parity
@torch.no_grad()
def test_projected_features_match_hf_several_tiles(hf_model):
    vit, projector = native_from_hf(hf_model)
    x = pixels(3, IMAGE)
    expected = hf_model.get_image_features(pixel_values=x).pooler_output
    features = vit(x)
    got = projector(features)
    assert got.shape == (3, (IMAGE // PATCH // 2) ** 2, LLM_HIDDEN)
    assert (got - expected).abs().max().item() <= PARITY_ATOL
    hf_vit = hf_model.model.vision_tower(pixel_values=x).last_hidden_state[:, 1:]
    assert (features - hf_vit).abs().max().item() <= PARITY_ATOL


@torch.no_grad()
def test_select_layer_matches_hf_hidden_state_index(hf_model):
    vit, projector = native_from_hf(hf_model, select_layer=-2)
    x = pixels(2, IMAGE, seed=3)
    expected = hf_model.get_image_features(
        pixel_values=x, vision_feature_layer=-2, output_hidden_states=True).pooler_output
    assert (projector(vit(x)) - expected).abs().max().item() <= PARITY_ATOL
    last, _ = native_from_hf(hf_model)
    assert (vit(x) - last(x)).abs().max().item() > 1e-3, "select_layer had no effect"


@torch.no_grad()
def test_other_input_size_matches_hf(hf_model):
    vit, projector = native_from_hf(hf_model)
    square = pixels(2, 84, seed=4)  # 6x6 patch grid instead of 8x8
    expected = hf_model.get_image_features(pixel_values=square).pooler_output
    assert (projector(vit(square)) - expected).abs().max().item() <= PARITY_ATOL
    wide = pixels(2, 56, 98, seed=5)  # 4x7 grid: HF's projector path assumes a square
    hf_vit = hf_model.model.vision_tower(pixel_values=wide).last_hidden_state[:, 1:]
    assert (vit(wide) - hf_vit).abs().max().item() <= PARITY_ATOL


# ---------------------------------------------------------- position interpolation
def keys_cubic_weights(t: float, a: float = -0.75):
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional position t (Keys kernel)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] matrix of 1-D bicubic resizing, half-pixel centres (align_corners=False),
    taps beyond the border clamped to the edge sample."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    for out_index in range(n_out):
        source = (out_index + 0.5) * n_in / n_out - 0.5
        base = math.floor(source)
        for tap, weight in zip(range(base - 1, base + 3), keys_cubic_weights(source - base)):
            matrix[out_index, min(max(tap, 0), n_in - 1)] += weight
    return matrix


@pytest.mark.parametrize("grid_hw", [(6, 4), (11, 11), (3, 8)])
def test_position_interpolation_matches_plain_bicubic(grid_hw):
    vit = InternViT(tiny_vision_config())
    randomize_(vit, seed=6)
    side = IMAGE // PATCH
    table = vit.position_embedding.detach().double()
    patch_grid = table[0, 1:].reshape(side, side, WIDTH)
    rows, cols = bicubic_matrix(side, grid_hw[0]), bicubic_matrix(side, grid_hw[1])
    resized = torch.einsum("ai,ijc,bj->abc", rows, patch_grid, cols).reshape(-1, WIDTH)
    got = vit.position_embedding_for(*grid_hw).detach()
    assert got.shape == (1, 1 + grid_hw[0] * grid_hw[1], WIDTH)
    assert torch.equal(got[0, 0], vit.position_embedding[0, 0].detach())
    assert (got[0, 1:].double() - resized).abs().max().item() <= 1e-5


def test_native_grid_uses_the_table_unchanged():
    vit = InternViT(tiny_vision_config())
    side = IMAGE // PATCH
    assert vit.position_embedding_for(side, side) is vit.position_embedding


# ------------------------------------------------------------ chunking, recompute
@torch.no_grad()
def test_chunked_encode_equals_unchunked():
    whole = InternViT(tiny_vision_config(encode_chunk_size=256))
    randomize_(whole, seed=7)
    chunked = InternViT(tiny_vision_config(encode_chunk_size=2))
    chunked.load_state_dict(whole.state_dict())
    calls = []
    chunked.patch_embedding.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    x = pixels(5, IMAGE, seed=8)
    expected = whole(x)
    got = chunked(x)
    assert calls == [2, 2, 1]
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-6


def test_empty_input_gives_empty_features():
    vit = InternViT(tiny_vision_config())
    assert vit(pixels(0, IMAGE)).shape == (0, (IMAGE // PATCH) ** 2, WIDTH)


def test_recompute_gives_same_grads_and_recomputes():
    grads, forwards = {}, {}
    x = pixels(3, IMAGE, seed=9)
    gen = torch.Generator().manual_seed(10)
    weight = torch.randn(3, (IMAGE // PATCH) ** 2, WIDTH, generator=gen)
    for recompute in (False, True):
        vit = InternViT(tiny_vision_config(), recompute=recompute)
        randomize_(vit, seed=11)
        count = [0]
        # a pre-hook: the recompute stops early, before a forward hook would fire
        vit.layers[0].register_forward_pre_hook(lambda m, i: count.__setitem__(0, count[0] + 1))
        (vit(x) * weight).sum().backward()
        grads[recompute] = {n: p.grad.clone() for n, p in vit.named_parameters()}
        forwards[recompute] = count[0]
    assert forwards == {False: 1, True: 2}
    for name, grad in grads[False].items():
        assert (grads[True][name] - grad).abs().max().item() <= 1e-6, name


# ------------------------------------------------------------------ backend seam
class CpuFlashBackend(Backend):
    """Test backend: attention from PyTorch's CPU flash kernels (which return lse); records the
    q shapes it sees. The vision encoder needs nothing else from a backend."""

    name = "test-cpu-flash"
    dist_backend = "gloo"

    def __init__(self):
        self.seen = []

    @classmethod
    def probe(cls):
        return None

    def device(self, local_rank=0):
        return torch.device("cpu")

    def max_memory_allocated(self):
        return 0

    def attention_forward(self, q, k, v, params):
        assert not params.is_packed, "ViT attention is dense"
        causal = params.mask != "none"
        self.seen.append((tuple(q.shape), causal))
        scale = default_scale(q.shape[-1], params.scale)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, scale=scale)
        return out.transpose(1, 2), lse

    def attention_backward(self, dout, q, k, v, out, lse, params):
        causal = params.mask != "none"
        scale = default_scale(q.shape[-1], params.scale)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            out.transpose(1, 2), lse, 0.0, causal, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)

    def rms_norm(self, x, weight, eps):
        raise AssertionError("the vision encoder must not call rms_norm")

    def apply_rotary(self, x, cos, sin):
        raise AssertionError("the vision encoder must not call apply_rotary")

    def swiglu(self, x):
        raise AssertionError("the vision encoder must not call swiglu")


def test_backend_attention_matches_sdpa_path():
    backend = CpuFlashBackend()
    plain = InternViT(tiny_vision_config())
    randomize_(plain, seed=12)
    kernel = InternViT(tiny_vision_config(), backend=backend)
    kernel.load_state_dict(plain.state_dict())
    x = pixels(2, IMAGE, seed=13)
    out_plain, out_kernel = plain(x), kernel(x)
    tokens = 1 + (IMAGE // PATCH) ** 2
    assert backend.seen == [((2, tokens, HEADS, WIDTH // HEADS), False)] * LAYERS
    assert (out_kernel - out_plain).abs().max().item() <= 1e-5
    out_plain.square().sum().backward()
    out_kernel.square().sum().backward()
    for (name, p_plain), p_kernel in zip(plain.named_parameters(), kernel.parameters()):
        scale = p_plain.grad.abs().max().item()
        assert (p_kernel.grad - p_plain.grad).abs().max().item() <= 1e-5 * max(1.0, scale), name


# ----------------------------------------------------------------- validation
def test_bad_inputs_raise_clear_errors():
    vit = InternViT(tiny_vision_config())
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        vit(torch.zeros(1, 4, IMAGE, IMAGE))
    with pytest.raises(ValueError, match="patch_size=14"):
        vit(torch.zeros(1, 3, IMAGE, IMAGE + 3))
    with pytest.raises(ValueError, match="select_layer=3"):
        InternViT(tiny_vision_config(select_layer=3))
    with pytest.raises(ValueError, match="encode_chunk_size=0"):
        InternViT(tiny_vision_config(encode_chunk_size=0))


def test_layer_id_for_layer_wise_decay():
    vit = InternViT(tiny_vision_config())
    ids = {name: InternViT.layer_id(name) for name, _ in vit.named_parameters()}
    assert ids["position_embedding"] == ids["patch_embedding.weight"] == 0
    assert ids["layers.0.attn.qkv.weight"] == 1 and ids["layers.1.mlp_scale"] == 2
    with pytest.raises(KeyError, match="norm.weight"):
        InternViT.layer_id("norm.weight")


# ----------------------------------------------------------------- conversion
def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_hf_vision_round_trip_is_bit_exact(hf_model):
    hf_state = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()
                if k.startswith("model.vision_tower.")}
    native = hf_to_native_vision(hf_state)
    assert_same_state(native_to_hf_vision(native), hf_state)
    assert_same_state(hf_to_native_vision(native_to_hf_vision(native)), native)
    vit = InternViT(tiny_vision_config())
    assert sorted(native) == sorted(vit.state_dict())
    fused = native["layers.1.attn.qkv.weight"]
    assert torch.equal(fused[WIDTH:2 * WIDTH],
                       hf_state["model.vision_tower.encoder.layer.1.attention.k_proj.weight"])
    assert torch.equal(native["layers.0.mlp_scale"],
                       hf_state["model.vision_tower.encoder.layer.0.lambda_2"])


def internvit_reference(state, x, heads, eps, patch):
    """Plain InternViT forward written against the ORIGINAL checkpoint names (ls1 scales the
    attention branch, norm1 precedes attention); returns patch features without CLS."""
    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], state[name + ".weight"], state[name + ".bias"], eps)

    h = F.conv2d(x, state["embeddings.patch_embedding.weight"],
                 state["embeddings.patch_embedding.bias"], stride=patch).flatten(2).transpose(1, 2)
    cls = state["embeddings.class_embedding"].expand(h.shape[0], -1, -1)
    h = torch.cat([cls, h], dim=1) + state["embeddings.position_embedding"]
    b, s, width = h.shape
    layer = 0
    while f"encoder.layers.{layer}.ls1" in state:
        p = f"encoder.layers.{layer}."
        qkv = F.linear(norm(h, p + "norm1"), state[p + "attn.qkv.weight"],
                       state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, s, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        attn = (probs @ v).transpose(1, 2).reshape(b, s, width)
        h = h + state[p + "ls1"] * F.linear(attn, state[p + "attn.proj.weight"],
                                             state[p + "attn.proj.bias"])
        mlp = F.gelu(F.linear(norm(h, p + "norm2"), state[p + "mlp.fc1.weight"],
                              state[p + "mlp.fc1.bias"]))
        h = h + state[p + "ls2"] * F.linear(mlp, state[p + "mlp.fc2.weight"],
                                             state[p + "mlp.fc2.bias"])
        layer += 1
    return h[:, 1:]


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["", "vision_model."])
def test_internvit_naming_loads_the_original_architecture(prefix):
    source = InternViT(tiny_vision_config())
    randomize_(source, seed=14)
    original = native_to_hf_internvit(source.state_dict(), prefix=prefix)
    assert {k for k in original if ".layers.0." in "." + k} == {
        prefix + "encoder.layers.0." + s for s in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
            "attn.proj.bias", "ls1", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
            "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "ls2")}
    loaded = InternViT(tiny_vision_config())
    loaded.load_state_dict(hf_internvit_to_native(original, prefix=prefix))
    unprefixed = {k[len(prefix):]: v for k, v in original.items()}
    x = pixels(2, IMAGE, seed=15)
    expected = internvit_reference(unprefixed, x, HEADS, 1e-6, PATCH)
    assert (loaded(x) - expected).abs().max().item() <= 1e-5
    assert_same_state(hf_internvit_to_native(original, prefix=prefix), source.state_dict())


def test_converter_errors_name_the_key(hf_model):
    state = dict(hf_model.state_dict())
    with pytest.raises(WeightMappingError, match="model.vision_tower.encoder.layer.0.extra"):
        hf_to_native_vision({**state, "model.vision_tower.encoder.layer.0.extra": torch.zeros(1)})
    del state["model.vision_tower.encoder.layer.1.attention.k_proj.bias"]
    with pytest.raises(WeightMappingError,
                       match="model.vision_tower.encoder.layer.1.attention.k_proj.bias"):
        hf_to_native_vision(state)
    with pytest.raises(WeightMappingError, match="no original InternViT weights under prefix"):
        hf_internvit_to_native(state, prefix="vision_model.")
    with pytest.raises(WeightMappingError, match="layers.0.attn.qk.weight"):
        native_to_hf_vision({"layers.0.attn.qk.weight": torch.zeros(3, 3)})
