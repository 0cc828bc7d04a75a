"""Request validation where requests arrive, before they reach the engine.

vLLM runs each custom logits processor's ``validate_params`` on every request as it is added,
in the process that accepts it (the offline ``LLM`` or the OpenAI server), and turns a
``ValueError`` into an error for that request alone (HTTP 400 over the server). That is where a
steering is parsed and checked against the attached sites' shapes. The processor does nothing
to the logits.

``validate_params`` is a classmethod and sees only the request, so the sites' shapes are
registered per process (``register``) by whoever starts the engine there. A process may
serve several engines only if they attach the same sites with the same shapes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from ..edits import Steering
from ..features import Features, features_from_json
from ..lowering.sites import Site
from ..runtime.engine import SiteShape, validate_record, validate_steering
from ..runtime.state import Capacity
from ..sae import SAE
from .spec import RECORD_KEY, RECORD_NAME_KEY, STEERING_KEY

MAX_RECORD_KEY_LENGTH = 256


class _FrontEnd:
    """The attached sites' shapes of the steered engines this process accepts requests for, and
    whether they serve HTTP clients (``served``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._shapes: dict[str, SiteShape] | None = None
        self.served = False
        self._engines = 0

    def register(self, shapes: Mapping[str, SiteShape], served: bool) -> None:
        shapes = dict(shapes)
        with self._lock:
            if self._engines and (shapes, served) != (self._shapes, self.served):
                raise ValueError(
                    "sae_compile.vllm: another steered engine in this process attaches other sites "
                    f"({sorted(self._shapes or {})}); requests are validated per process, so one process "
                    "serves engines with the same sites only. Shut the other engine down first."
                )
            self._shapes, self.served, self._engines = shapes, served, self._engines + 1

    def unregister(self) -> None:
        with self._lock:
            self._engines = max(0, self._engines - 1)
            if self._engines == 0:
                self._shapes = None

    def shapes(self) -> dict[str, SiteShape]:
        with self._lock:
            if self._shapes is None:
                raise ValueError("sae_compile.vllm: this process has no steered engine to validate the request's steering against.")
            return self._shapes


_FRONT_END = _FrontEnd()


def register(shapes: Mapping[str, SiteShape], *, served: bool = False) -> None:
    """Validate this process's requests against ``shapes`` until a matching ``unregister``.
    ``served``: the requests come from HTTP clients of an engine that reads no prefix cache."""
    _FRONT_END.register(shapes, served)


def unregister() -> None:
    """An engine registered with ``register`` is gone."""
    _FRONT_END.unregister()


def request_steering(params: SamplingParams) -> Steering | None:
    """The steering a request carries (``None``: unsteered), parsed and validated.

    Raises ValueError naming the problem: malformed JSON, an unattached site, a feature out of
    range, a non-finite value, a vector of the wrong length, too many clamps.
    """
    text = (params.extra_args or {}).get(STEERING_KEY)
    if text is None:
        return None
    steering = Steering.from_json(text)
    try:
        validate_steering(steering, _FRONT_END.shapes())
    except TypeError as error:
        raise ValueError(str(error)) from error
    return steering


def request_record(params: SamplingParams) -> tuple[Features, ...]:
    """The features a request records (``()``: none), parsed and validated.

    Raises ValueError naming the problem: malformed JSON, an unattached site or one without an
    SAE, a ``top_k`` or feature list the record buffers cannot hold, a feature out of range, a
    request of ``n > 1`` samples, one that may read prompt positions from the prefix cache
    (they would not be computed, so not recorded), or, from a server's client, one that names
    no key to fetch its records by.
    """
    extra_args = params.extra_args or {}
    text = extra_args.get(RECORD_KEY)
    if text is None:
        return ()
    requests = features_from_json(text)
    if params.n != 1:
        raise ValueError(f"record: a request of n={params.n} samples cannot record; record one sample per request (n=1).")
    if not (_FRONT_END.served or params.skip_reading_prefix_cache):
        raise ValueError(
            "record: a recording request must compute every prompt position, so it must skip the prefix cache "
            "(skip_reading_prefix_cache=True, which sae_compile.vllm.sampling_params(record=...) sets)."
        )
    _check_record_key(extra_args.get(RECORD_NAME_KEY))
    validate_record(requests, _FRONT_END.shapes())
    return requests


def _check_record_key(key: object) -> None:
    if key is None and _FRONT_END.served:
        raise ValueError(
            f"record: name the key to fetch this request's records by, in vllm_xargs[{RECORD_NAME_KEY!r}] "
            "(a string unique to the request, such as a UUID), then POST it to /v1/sae_features."
        )
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= MAX_RECORD_KEY_LENGTH):
        raise ValueError(f"record: {RECORD_NAME_KEY} must be a string of 1 to {MAX_RECORD_KEY_LENGTH} characters, got {key!r:.80}.")


def front_end_shapes(
    saes: Mapping[str, SAE], additive: Sequence[str], text_config: Any, max_clamps: int, max_top_k: int = 0
) -> dict[str, SiteShape]:
    """The shape of each attached site (``additive``: no SAE); raises ValueError for a site the
    model does not have or an SAE that does not fit it."""
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    capacity = Capacity(max_clamps=max_clamps, max_top_k=max_top_k)
    shapes = {}
    for name in [*additive, *saes]:
        site = Site.parse(name) if isinstance(name, str) else None
        if site is not None and not site.kind.on_residual_stream:
            raise ValueError(
                f"Site {name!r} is inside a branch; under vLLM only the residual stream and the branch outputs "
                "can be steered so far (blocks.L.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post))."
            )
        if site is None or site.layer >= layers:
            raise ValueError(
                f"Unknown site {name!r}: sites are blocks.L.hook_(resid_pre|attn_out|resid_mid|mlp_out|resid_post) "
                f"with L in 0..{layers - 1}."
            )
        sae = saes.get(name)
        if sae is not None and sae.d_in != hidden:
            raise ValueError(f"The SAE for {name} has d_in={sae.d_in} but the model's hidden size is {hidden}.")
        shapes[name] = SiteShape(hidden, 0 if sae is None else sae.d_sae, capacity)
    return shapes


class SteeringValidator(LogitsProcessor):
    """Validates ``extra_args["sae_steering"]`` and ``["sae_record"]`` of each request; leaves
    the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_steering(sampling_params)
        request_record(sampling_params)

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
