"""Checks shared by the backend test files."""
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
