"""``POST /v1/sae_features``: a server's clients fetch what their requests recorded.

A recording request names a key of its own (``vllm_xargs["sae_record_key"]``); once it has
finished, ``{"keys": [...]}`` posted here answers ``{key: {site: record}}`` for the keys whose
records the workers hold, and the workers forget them. A record is ``{"dtype", "values",
"indices", "features"}`` (``records.record_to_json``): ``values [1, positions, width]`` over
every position the request computed (its prompt, then each generated token but the last),
``indices`` alike for a top-k request (-1 at padding), None for a dense one.

``sae-compile serve`` installs it as an ASGI middleware (vLLM's ``--middleware``), which sees a
request before vLLM's own middleware does, so this path checks vLLM's API keys itself, with
vLLM's own check.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from vllm import envs
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from .records import record_from_wire, record_to_json
from .validation import MAX_RECORD_KEY_LENGTH

PATH = "/v1/sae_features"
#: Keys one request may fetch.
MAX_KEYS = 1024


class RecordsEndpoint:
    """The ASGI middleware that answers ``POST /v1/sae_features`` and passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._guarded: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].removeprefix(scope.get("root_path", "")) != PATH:
            await self.app(scope, receive, send)
            return
        await self._endpoint(scope)(scope, receive, send)

    def _endpoint(self, scope: Scope) -> ASGIApp:
        """The endpoint, behind vLLM's API-key check when the server has keys."""
        if self._guarded is None:
            args = scope["app"].state.args
            tokens = [key for key in (args.api_key or [envs.VLLM_API_KEY]) if key]
            self._guarded = AuthenticationMiddleware(_answer, tokens) if tokens else _answer
        return self._guarded


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    if request.method != "POST":
        response = JSONResponse({"error": f"{PATH} takes POST."}, status_code=405)
    else:
        try:
            keys = _keys(await request.body())
        except ValueError as error:
            response = JSONResponse({"error": str(error)}, status_code=400)
        else:
            response = JSONResponse(await _taken(scope["app"].state.engine_client, keys))
    await response(scope, receive, send)


async def _taken(engine: Any, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The records of ``keys`` that the workers hold, as JSON, by key and site."""
    ranks = await engine.collective_rpc("sae_compile_take_keyed_records", args=(keys,))
    taken = ranks[0]  # every rank records alike
    return {key: {name: record_to_json(record_from_wire(wire)) for name, wire in sites.items()} for key, sites in taken.items()}


def _keys(body: bytes) -> list[str]:
    """The keys of a request body ``{"keys": [...]}``; ValueError naming what is wrong."""
    try:
        data: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"the body must be JSON: {error}.") from error
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not keys or len(keys) > MAX_KEYS:
        raise ValueError(f'the body must be {{"keys": [...]}} with 1 to {MAX_KEYS} record keys.')
    if not all(isinstance(key, str) and 0 < len(key) <= MAX_RECORD_KEY_LENGTH for key in keys):
        raise ValueError(f"the body's keys must each be a string of 1 to {MAX_RECORD_KEY_LENGTH} characters.")
    return keys
