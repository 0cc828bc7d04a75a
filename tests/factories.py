"""Random SAEs and comparison helpers for tests."""

from __future__ import annotations

import torch

from sae_compile import SAE


def random_sae(
    d_in: int,
    d_sae: int,
    activation: str = "jumprelu",
    *,
    seed: int = 0,
    k: int | None = None,
    apply_b_dec_to_input: bool = False,
    hook_name: str | None = None,
    dtype: torch.dtype = torch.float32,
    threshold_low: float = 0.0,
) -> SAE:
    """An SAE whose features fire on roughly half of typical inputs, with O(1) decoder rows,
    so clamps move the residual stream visibly. JumpReLU thresholds are uniform in
    ``[threshold_low, threshold_low + 0.2)``; a negative one tells SAELens' convention
    (``relu(pre) * (pre > theta)``) from ``pre * (pre > theta)``."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    b_enc = 0.1 * torch.randn(d_sae, generator=g)
    b_dec = 0.1 * torch.randn(d_in, generator=g)
    threshold = threshold_low + 0.2 * torch.rand(d_sae, generator=g) if activation == "jumprelu" else None
    if activation == "topk" and k is None:
        k = max(1, d_sae // 8)
    return SAE(
        W_enc.to(dtype), W_dec.to(dtype), b_enc.to(dtype), b_dec.to(dtype),
        activation=activation, threshold=None if threshold is None else threshold.to(dtype),
        k=k if activation == "topk" else None, apply_b_dec_to_input=apply_b_dec_to_input, hook_name=hook_name,
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_err(actual, expected)
    assert err <= tol, f"relative error {err:.3e} > {tol:.0e}"
