"""Per-step routing: hand a vLLM model runner's batch to the engine's steering state.

vLLM flattens the running requests into one ``[num_tokens, hidden]`` batch, in the order of
``input_batch.req_ids``, request ``i`` owning ``query_start_loc[i]:query_start_loc[i + 1]``.
``BatchRouter`` wraps the runner's ``_model_forward`` (the one call every real forward goes
through, after the batch is prepared and before the model runs): it admits the requests it has
not seen, releases those that left, and writes the token-major routing the op reads. Dummy and
profiling forwards call the model directly and run with whatever routing the last real
forward left, which only their discarded outputs see.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..edits import Steering
from ..runtime.engine import EngineState
from .spec import STEERING_KEY

logger = logging.getLogger(__name__)


class BatchRouter:
    """Installed as ``runner._model_forward``; routes each forward, then calls the original."""

    def __init__(self, runner: Any, state: EngineState) -> None:
        self._runner = runner
        self._state = state
        self._forward = runner._model_forward
        runner._model_forward = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        self._route(positions)
        return self._forward(*args, **kwargs)

    def _route(self, positions: torch.Tensor) -> None:
        batch = self._runner.input_batch
        request_ids = batch.req_ids[: batch.num_reqs]
        self._state.sync(request_ids, self._describe)
        starts = self._runner.query_start_loc.cpu[: len(request_ids) + 1]
        # M-RoPE models carry [3, N] positions; the first row is the token's position.
        self._state.route(request_ids, starts.diff(), positions if positions.dim() == 1 else positions[0])

    def _describe(self, request_id: str) -> tuple[Steering | None, int]:
        """A new request's steering and prompt length, read from the runner's request state."""
        request = self._runner.requests[request_id]
        text = (request.sampling_params.extra_args or {}).get(STEERING_KEY)
        try:
            steering = None if text is None else Steering.from_json(text)
        except ValueError as error:
            # The front end validates every request; one that bypassed it must not take the
            # worker (and every other request) down.
            logger.error("sae_compile: request %s runs unsteered: %s", request_id, error)
            steering = None
        return steering, request.num_prompt_tokens
