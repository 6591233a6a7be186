"""Shared pytest setup: deterministic, single-threaded-friendly CPU runs."""
import os

os.environ.setdefault("MINDSPEED_VITA_BACKEND", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# RSS-based peak-memory assertions (benchmarks, chunked head) need glibc to mmap large blocks
# from the very first allocation of the test session; otherwise heap memory freed by earlier
# tests is recycled without raising the peak, and those assertions flake.
from backends.cpu import CPUBackend  # noqa: E402

CPUBackend._mmap_large_allocations()
