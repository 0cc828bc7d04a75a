"""The vllm tier's environment (vLLM's CPU build needs its KV-cache size set, in GiB) and the
random Llama folder that a test module's engine serves."""

from __future__ import annotations

import os

import pytest

from tests.serving.engine_models import save_llama

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return save_llama(tmp_path_factory.mktemp("llama"))
