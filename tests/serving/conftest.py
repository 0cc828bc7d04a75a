"""The vllm tier's environment: vLLM's CPU build needs its KV-cache size set (in GiB)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
