"""Shared pytest setup: hypothesis profiles, the ``cuda`` skip, and determinism."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Before anything imports triton (torch._dynamo does): Triton picks its interpreter at
    # import, and the kernel tests run under it on CPU-only machines.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# "default": the default tier's budget (>= 50 examples per property); "ci": a larger sweep.
settings.register_profile(
    "default", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

torch.set_num_threads(min(torch.get_num_threads(), 2))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
