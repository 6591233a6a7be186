"""backends.meta: builds allocate nothing, and the patched megatron device query is restored."""
import pytest
import torch

from backends import get_backend
from backends.meta import meta_build


def test_meta_build_places_default_and_explicit_current_device_allocations_on_meta():
    backend = get_backend("cpu")
    before = torch.cuda.current_device
    with meta_build(backend) as meta_backend:
        implicit = torch.empty(1 << 40)  # 4 TiB: would fail if it were real
        explicit = torch.empty(1 << 40, device=torch.cuda.current_device())
        module = torch.nn.Linear(1 << 20, 1 << 20).to(meta_backend.device())
        assert meta_backend.name == backend.name  # everything else is the wrapped backend's
    assert implicit.is_meta and explicit.is_meta and module.weight.is_meta
    assert torch.cuda.current_device is before
    assert torch.empty(1).device.type == "cpu"


def test_meta_build_restores_current_device_after_an_error():
    before = torch.cuda.current_device
    with pytest.raises(RuntimeError, match="boom"):
        with meta_build(get_backend("cpu")):
            raise RuntimeError("boom")
    assert torch.cuda.current_device is before
