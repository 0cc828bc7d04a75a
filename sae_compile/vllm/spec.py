"""What a steered engine is configured with, as it travels to vLLM's worker processes.

The engine's ``additional_config["sae_compile"]`` (JSON, hashed into vLLM's config hash, so
its compile cache keeps steered and plain graphs apart) names each attached site's SAE folder
and the capacities. Workers load the SAEs themselves; the front end (the process that accepts
requests) keeps the sites' shapes to validate requests before they reach the engine.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..runtime.state import Capacity

#: The ``SamplingParams.extra_args`` key (and ``vllm_xargs`` key) of a request's steering JSON.
STEERING_KEY = "sae_steering"
#: The ``SamplingParams.extra_args`` key of a request's record requests (``features_to_json``).
RECORD_KEY = "sae_record"
#: The ``extra_args`` key of the client's name for a request's records (how a server's client fetches them).
RECORD_NAME_KEY = "sae_record_key"
CONFIG_KEY = "sae_compile"


@dataclass(frozen=True)
class EngineSpec:
    """Attached sites (site -> SAE folder, ``None`` for additive-only), the clamps per request
    and site, and the widest feature record (0: the engine records nothing). The other
    capacities are the engine's own: a row per request of a batch (vLLM's ``max_num_seqs``),
    so a batch never runs out of rows, and its largest token batch."""

    saes: Mapping[str, str | None]
    max_clamps: int
    max_top_k: int = 0

    def capacity(self, max_rows: int, max_tokens: int) -> Capacity:
        # The op sees a token-major batch as max_tokens one-token batch rows, and so does a record plan.
        return Capacity(
            max_rows, self.max_clamps, max_batch=max_tokens, max_tokens=max_tokens, with_call_rows=False, max_top_k=self.max_top_k
        )

    def to_config(self) -> dict[str, Any]:
        """The JSON-able form carried in ``additional_config[CONFIG_KEY]``."""
        return {"saes": dict(sorted(self.saes.items())), "max_clamps": self.max_clamps, "max_top_k": self.max_top_k}

    @classmethod
    def from_config(cls, additional_config: Mapping[str, Any] | None) -> EngineSpec | None:
        """The spec in an engine's ``additional_config`` (``None``: the engine is not steered)."""
        config = (additional_config or {}).get(CONFIG_KEY)
        if config is None:
            return None
        return cls(dict(config["saes"]), int(config["max_clamps"]), int(config["max_top_k"]))

    def digest(self, *parts: str) -> str:
        """A digest of the spec and ``parts`` (model, dtype, capacity): the prefix of the site handles."""
        text = json.dumps([self.to_config(), *parts], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
