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
from ..lowering.sites import Site
from ..runtime.engine import SiteShape, validate_steering
from ..runtime.state import Capacity
from ..sae import SAE
from .spec import STEERING_KEY

_LOCK = threading.Lock()
_SHAPES: dict[str, SiteShape] | None = None
_ENGINES = 0


def register(shapes: Mapping[str, SiteShape]) -> None:
    """Validate this process's requests against ``shapes`` until a matching ``unregister``."""
    global _SHAPES, _ENGINES
    shapes = dict(shapes)
    with _LOCK:
        if _ENGINES and shapes != _SHAPES:
            raise ValueError(
                "sae_compile.vllm: another steered engine in this process attaches other sites "
                f"({sorted(_SHAPES or {})}); requests are validated per process, so one process serves "
                "engines with the same sites only. Shut the other engine down first."
            )
        _SHAPES, _ENGINES = shapes, _ENGINES + 1


def unregister() -> None:
    global _SHAPES, _ENGINES
    with _LOCK:
        _ENGINES = max(0, _ENGINES - 1)
        if _ENGINES == 0:
            _SHAPES = None


def request_steering(params: SamplingParams) -> Steering | None:
    """The steering a request carries (``None``: unsteered), parsed and validated.

    Raises ValueError naming the problem: malformed JSON, an unattached site, a feature out of
    range, a non-finite value, a vector of the wrong length, too many clamps.
    """
    text = (params.extra_args or {}).get(STEERING_KEY)
    if text is None:
        return None
    steering = Steering.from_json(text)
    with _LOCK:
        shapes = _SHAPES
    if shapes is None:
        raise ValueError("sae_compile.vllm: this process has no steered engine to validate the request's steering against.")
    try:
        validate_steering(steering, shapes)
    except TypeError as error:
        raise ValueError(str(error)) from error
    return steering


def front_end_shapes(saes: Mapping[str, SAE], additive: Sequence[str], text_config: Any, max_clamps: int) -> dict[str, SiteShape]:
    """The shape of each attached site (``additive``: no SAE); raises ValueError for a site the
    model does not have or an SAE that does not fit it."""
    hidden, layers = text_config.hidden_size, text_config.num_hidden_layers
    capacity = Capacity(max_clamps=max_clamps)
    shapes = {}
    for name in [*additive, *saes]:
        site = Site.parse(name) if isinstance(name, str) else None
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
    """Validates ``extra_args["sae_steering"]`` of each request; leaves the logits alone."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_steering(sampling_params)

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
