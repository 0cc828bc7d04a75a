"""Per-step routing: hand a vLLM model runner's batch to the engine's steering state.

vLLM flattens the running requests into one ``[num_tokens, hidden]`` batch, in the order of
``input_batch.req_ids``, request ``i`` owning ``query_start_loc[i]:query_start_loc[i + 1]``.
``BatchRouter`` wraps the runner's ``_model_forward`` (the one call every real forward goes
through, after the batch is prepared and before the model runs): it admits the requests it has
not seen, releases those that left, and writes the token-major routing the op reads; after the
forward it keeps what the recording requests recorded. Dummy and profiling forwards call the
model directly and run with whatever routing the last real forward left, which only their
discarded outputs see.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..edits import Steering
from ..features import features_from_json
from ..runtime.engine import EngineState, RequestSpec
from .spec import RECORD_KEY, RECORD_NAME_KEY, STEERING_KEY

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
        output = self._forward(*args, **kwargs)
        self._state.recording.collect()
        return output

    def _route(self, positions: torch.Tensor) -> None:
        batch = self._runner.input_batch
        request_ids = batch.req_ids[: batch.num_reqs]
        self._state.sync(request_ids, self._describe)
        starts = self._runner.query_start_loc.cpu[: len(request_ids) + 1]
        # M-RoPE models carry [3, N] positions; the first row is the token's position.
        self._state.route(request_ids, starts.diff(), positions if positions.dim() == 1 else positions[0])

    def _describe(self, request_id: str) -> RequestSpec:
        """A new request's steering, prompt length, record requests and their key, read from the runner's
        request state. The front end validates every request; one that bypassed it and does not
        parse runs unsteered, or unrecorded, rather than take the worker (and every other
        request) down."""
        request = self._runner.requests[request_id]
        extra_args = request.sampling_params.extra_args or {}
        steering = _parsed(request_id, extra_args.get(STEERING_KEY), Steering.from_json)
        record = _parsed(request_id, extra_args.get(RECORD_KEY), lambda text: self._state.checked_record(features_from_json(text)))
        return RequestSpec(steering, request.num_prompt_tokens, record or (), extra_args.get(RECORD_NAME_KEY))


def _parsed(request_id: str, text: str | None, parse: Callable[[str], Any]) -> Any:
    try:
        return None if text is None else parse(text)
    except ValueError as error:
        logger.error("sae_compile: request %s goes without it: %s", request_id, error)
        return None
