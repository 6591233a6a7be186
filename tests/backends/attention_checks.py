"""Checks and inputs shared by the backend test files."""
from typing import List, Sequence

import torch

from backends import reference


def assert_autograd_matches_reference(backend, q, k, v, dout, params, tol):
    """`backend.attention` (autograd through the backend's forward and backward) gives the same
    output and q/k/v gradients as autograd through the plain-PyTorch reference."""
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = backend.attention(*leaves, params)
    ref_out, _ = reference.attention_reference(*ref_leaves, params)
    torch.testing.assert_close(out, ref_out, **tol)
    out.backward(dout)
    ref_out.backward(dout)
    for got, expected in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, expected.grad, **tol)


def randn(*shape, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A standard-normal tensor from its own generator seeded `seed` (drawn in float32, then
    cast), so a test's inputs do not depend on what ran before it."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def cu_seqlens(lengths: Sequence[int]) -> List[int]:
    """`[0, l0, l0 + l1, ...]`: the cu_seqlens of packed sequences of `lengths`, as a list."""
    cu = [0]
    for length in lengths:
        cu.append(cu[-1] + length)
    return cu
