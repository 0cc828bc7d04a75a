"""``LLM`` and ``sampling_params``: the offline API of steered vLLM engines."""

from __future__ import annotations

import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import transformers
import vllm

from ..edits import EDIT_TYPES, Edit, Steering
from ..features import Features, features_to_json, padded
from ..runtime.engine_recording import RETAINED_REQUESTS
from ..sae import SAE
from . import validation
from .records import record_from_wire
from .spec import CONFIG_KEY, RECORD_KEY, STEERING_KEY, EngineSpec
from .validation import SteeringValidator

WORKER_CLS = "sae_compile.vllm.worker.SteeringWorker"
_RESERVED = ("worker_cls", "additional_config")


class LLM(vllm.LLM):
    """A ``vllm.LLM`` for ``model`` whose compiled graph steers at the given sites.

    ``saes`` maps TransformerLens site names (``blocks.3.hook_resid_post``) to an ``SAE`` or an
    SAE folder (``sc.SAE.load`` reads it in each worker); an ``SAE`` object is written to a
    temporary folder that lives as long as the engine. ``sites`` attaches further
    sites for ``AddVector`` only. Every request of a batch can hold a steering row of its
    own, so rows are vLLM's ``max_num_seqs``; ``max_rows``, if given, sets it. ``max_clamps``
    is the clamped features per request and site. ``max_top_k`` sizes the feature records
    (0: requests cannot record). Everything else goes to ``vllm.LLM``.

    Requests steer themselves with ``sampling_params(steering)``, and read features with
    ``sampling_params(record=[sc.Features(...)])``: each finished output of ``generate`` (or
    ``wait_for_completion``) that recorded then has ``features``, a dict from site to a
    ``FeatureRecord`` of ``[1, prompt + generated tokens, width]`` (the last generated token is
    never fed back, so it is padding). A bad steering or record request raises ValueError,
    naming the problem, before the request reaches the engine, which serves on.
    """

    def __init__(
        self,
        model: str,
        saes: Mapping[str, SAE | str] | None = None,
        *,
        sites: Sequence[str] = (),
        max_rows: int | None = None,
        max_clamps: int = 16,
        max_top_k: int = 0,
        **vllm_kwargs: Any,
    ) -> None:
        for name in _RESERVED:
            if name in vllm_kwargs:
                raise ValueError(f"sae_compile.vllm.LLM sets {name}= itself; it cannot be passed.")
        if vllm_kwargs.get("enforce_eager"):
            raise ValueError("sae_compile.vllm steers inside vLLM's compiled graph; enforce_eager=True compiles nothing.")
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=vllm_kwargs.get("trust_remote_code", False))
        _apply_max_rows(max_rows, vllm_kwargs)
        folder = tempfile.TemporaryDirectory(prefix="sae_compile_vllm_")
        loaded, paths = _materialise(saes or {}, Path(folder.name))
        spec = EngineSpec({**dict.fromkeys(sites), **paths}, max_clamps, max_top_k)
        validation.register(validation.front_end_shapes(loaded, sites, config.get_text_config(), max_clamps, max_top_k))
        self._recording: dict[str, str] = {}  # a recording request's internal id, by the id its output carries
        self._sae_release = weakref.finalize(self, _release, folder)
        vllm_kwargs["logits_processors"] = [*(vllm_kwargs.get("logits_processors") or []), SteeringValidator]
        super().__init__(model, worker_cls=WORKER_CLS, additional_config={CONFIG_KEY: spec.to_config()}, **vllm_kwargs)

    def steering_stats(self) -> list[dict[str, Any]]:
        """Per worker: graphs rewritten and compiled, admitted requests and the rows they hold."""
        return self.collective_rpc("sae_compile_stats")

    def _add_request(self, prompt: Any, params: Any, *args: Any, **kwargs: Any) -> str:
        # Every offline request passes here (vLLM's funnel for generate, chat and enqueue):
        # validating first makes a bad steering a ValueError of its own, not vLLM's wrapper.
        records = False
        if isinstance(params, vllm.SamplingParams):
            validation.request_steering(params)
            records = bool(validation.request_record(params))
        request_id = super()._add_request(prompt, params, *args, **kwargs)
        if records:
            # Workers know a request by its internal id; its output carries the external one.
            external = self.llm_engine.output_processor.request_states[request_id].external_req_id
            self._recording[external] = request_id
            _forget_oldest(self._recording, RETAINED_REQUESTS)
        return request_id

    def _run_engine(self, *args: Any, **kwargs: Any) -> list[Any]:
        outputs = super()._run_engine(*args, **kwargs)
        self._attach_features(outputs)
        return outputs

    def _attach_features(self, outputs: Sequence[Any]) -> None:
        """Set ``features`` on each finished output whose request recorded (see the class docstring)."""
        recorded = [output for output in outputs if output.request_id in self._recording]
        if not recorded:
            return
        internal = [self._recording.pop(output.request_id) for output in recorded]
        taken = self.collective_rpc("sae_compile_take_records", args=(internal,))[0]  # every rank records alike
        for output, request_id in zip(recorded, internal, strict=True):
            length = len(output.prompt_token_ids) + len(output.outputs[0].token_ids)
            records = {name: record_from_wire(wire) for name, wire in taken.get(request_id, {}).items()}
            output.features = {name: padded(record, length - record.values.shape[1]) for name, record in records.items()}


def sampling_params(
    steering: Steering | Sequence[Edit] | None = None, *, record: Sequence[Features] | None = None, **kwargs: Any
) -> vllm.SamplingParams:
    """``vllm.SamplingParams(**kwargs)`` for a request steered by ``steering`` (``None``: unsteered)
    that records the features ``record`` (``None``: nothing) at every position it computes.

    The steering travels as its JSON text in ``extra_args["sae_steering"]``, the record requests
    in ``extra_args["sae_record"]`` (``features_to_json``), beside any other ``extra_args``
    given; both are checked against the engine's sites when the request is added. A recording
    request skips the prefix cache, so that every prompt position is computed and recorded.
    """
    extra_args = dict(kwargs.pop("extra_args", None) or {})
    if steering is not None:
        extra_args[STEERING_KEY] = _as_steering(steering).to_json()
    if record is not None:
        extra_args[RECORD_KEY] = features_to_json(record)
        kwargs.setdefault("skip_reading_prefix_cache", True)
    return vllm.SamplingParams(extra_args=extra_args or None, **kwargs)


def _as_steering(steering: Steering | Sequence[Edit]) -> Steering:
    if isinstance(steering, Steering):
        return steering
    if isinstance(steering, (list, tuple)) and all(isinstance(edit, EDIT_TYPES) for edit in steering):
        return Steering(*steering)
    raise TypeError(f"steering must be a Steering, a list of edits or None, got {type(steering).__name__}.")


def _apply_max_rows(max_rows: int | None, vllm_kwargs: dict[str, Any]) -> None:
    """``max_rows`` is vLLM's ``max_num_seqs``: each request of a batch can hold a row of its own."""
    if max_rows is None:
        return
    max_num_seqs = vllm_kwargs.setdefault("max_num_seqs", max_rows)
    if max_num_seqs > max_rows:
        raise ValueError(
            f"max_rows={max_rows} is less than max_num_seqs={max_num_seqs}: a batch could hold more "
            "steered requests than there are rows. Give max_rows >= max_num_seqs."
        )


def _materialise(saes: Mapping[str, SAE | str], folder: Path) -> tuple[dict[str, SAE], dict[str, str]]:
    """Each site's SAE in memory (for the shapes) and on disk (for the workers)."""
    loaded, paths = {}, {}
    for index, (site, sae) in enumerate(saes.items()):
        if isinstance(sae, SAE):
            path = folder / f"sae_{index}"
            sae.save(path)
            loaded[site], paths[site] = sae, str(path)
        elif isinstance(sae, (str, Path)):
            loaded[site], paths[site] = SAE.load(sae), str(sae)
        else:
            raise TypeError(f"saes[{site!r}] must be an SAE or the path of an SAE folder, got {type(sae).__name__}.")
    return loaded, paths


def _forget_oldest(mapping: dict[str, str], limit: int) -> None:
    """Keep the newest ``limit`` entries: a worker keeps no more records than that either."""
    while len(mapping) > limit:
        del mapping[next(iter(mapping))]


def _release(folder: tempfile.TemporaryDirectory) -> None:
    """What an engine holds in this process beyond vLLM's own: its sites' shapes and SAE files."""
    validation.unregister()
    folder.cleanup()


