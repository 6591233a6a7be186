"""CPU fakes of accelerator packages, so accelerator backends can be tested on any machine."""
from backends.fakes.flash_fake import FakeAtenFlash, fake_flash_attn_modules
from backends.fakes.torch_npu_fake import (
    COMPRESSED_MASK_SIZE,
    MAX_TOCKENS,
    FakeNPUDeviceModule,
    FakeTorchNPU,
    compressed_causal_mask,
)

__all__ = ["COMPRESSED_MASK_SIZE", "MAX_TOCKENS", "FakeAtenFlash", "FakeNPUDeviceModule",
           "FakeTorchNPU", "compressed_causal_mask", "fake_flash_attn_modules"]
