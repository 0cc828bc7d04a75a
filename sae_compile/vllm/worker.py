"""The vLLM worker that steers: the platform's worker, plus the steering pass, state and router.

vLLM builds its worker from ``parallel_config.worker_cls``; ``LLM`` and ``serve`` name this one.
Its two additions, in the order vLLM needs them:

1. at construction, before the model exists: the steering pass goes into the compile options
   (vLLM hands ``inductor_compile_config`` to ``torch.compile`` when it builds the model; on
   GPU its pass manager runs the pass after vLLM's own fusion passes);
2. after the model is loaded, before the first forward compiles it: the SAEs are loaded and
   the engine state allocated on this worker's device, the pass is bound to the model's
   layers, and the router is installed on the model runner.

Under tensor parallelism every rank holds the full residual stream (vLLM all-reduces before
each residual add), so every rank holds the same state and steers the same way.
"""

from __future__ import annotations

from typing import Any

import torch._dynamo.utils
from vllm.compilation.passes.inductor_pass import InductorPass
from vllm.config import CompilationMode, CUDAGraphMode
from vllm.platforms import current_platform
from vllm.utils.import_utils import resolve_obj_by_qualname

from ..features import FeatureRecord
from ..lowering.engine_pass import EngineSteeringPass
from ..lowering.sites import layer_stack
from ..runtime.engine import EngineState
from ..sae import SAE
from .records import record_to_wire
from .router import BatchRouter
from .spec import EngineSpec

_POST_PASS = "post_grad_custom_post_pass"
_PLATFORM_WORKERS = {
    "cpu": "vllm.v1.worker.cpu_worker.CPUWorker",
    "cuda": "vllm.v1.worker.gpu_worker.Worker",
}


class VllmSteeringPass(EngineSteeringPass, InductorPass):
    """The steering pass as vLLM's pass manager takes it (an ``InductorPass``)."""


def _platform_worker() -> type:
    name = _PLATFORM_WORKERS.get(current_platform.device_type)
    if name is None:
        raise RuntimeError(f"sae_compile.vllm supports vLLM on {sorted(_PLATFORM_WORKERS)}, not {current_platform.device_type!r}.")
    return resolve_obj_by_qualname(name)


class SteeringWorker(_platform_worker()):
    """vLLM's worker for this platform, with per-request SAE steering (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sae_spec = EngineSpec.from_config(self.vllm_config.additional_config)
        if self.sae_spec is None:
            raise ValueError("sae_compile.vllm: SteeringWorker needs additional_config['sae_compile']; build the engine with sae_compile.vllm.LLM.")
        compilation = self.vllm_config.compilation_config
        if compilation.mode == CompilationMode.NONE:
            raise ValueError(
                "sae_compile.vllm steers inside vLLM's compiled graph, and this engine compiles nothing "
                "(enforce_eager=True, or a LoRA engine on CPU)."
            )
        if self.sae_spec.max_top_k and current_platform.device_type == "cuda" and compilation.cudagraph_mode != CUDAGraphMode.NONE:
            raise ValueError(
                "sae_compile.vllm records features on the host's plan, and vLLM's CUDA graphs would replay "
                "without it. Build the engine with max_top_k=0, or without CUDA graphs "
                "(compilation_config={'cudagraph_mode': 'NONE'})."
            )
        options = compilation.inductor_compile_config
        if _POST_PASS in options:
            raise ValueError(f"sae_compile.vllm: the engine already has a {_POST_PASS}; steering needs that slot.")
        self.sae_pass = VllmSteeringPass()
        options[_POST_PASS] = self.sae_pass
        self.sae_state: EngineState | None = None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        model_config = self.vllm_config.model_config
        hidden_size = model_config.get_hidden_size()
        saes = {site: None if path is None else SAE.load(path) for site, path in self.sae_spec.saes.items()}
        capacity = self.sae_spec.capacity(*self._batch_limits())
        digest = self.sae_spec.digest(model_config.model, str(model_config.dtype), repr(capacity))
        device = self.model_runner.device
        self.sae_state = EngineState(saes, hidden_size, capacity, model_config.dtype, device, digest)
        _, layers = layer_stack(self.model_runner.model)
        self.sae_pass.bind(layers, hidden_size, self.sae_state.handles)
        BatchRouter(self.model_runner, self.sae_state)

    def compile_or_warm_up_model(self, *args: Any, **kwargs: Any) -> Any:
        result = super().compile_or_warm_up_model(*args, **kwargs)
        if self.sae_pass.graphs == 0:
            raise RuntimeError("sae_compile.vllm: the engine compiled its model without running the steering pass.")
        return result

    def _batch_limits(self) -> tuple[int, int]:
        """The most requests and tokens one forward holds (CUDA-graph padding included)."""
        scheduler = self.vllm_config.scheduler_config
        padded = self.vllm_config.compilation_config.max_cudagraph_capture_size or 0
        return scheduler.max_num_seqs, max(scheduler.max_num_batched_tokens, padded)

    def sae_compile_take_records(self, request_ids: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """What ``request_ids`` recorded, by request and site (``records.record_to_wire`` of each
        ``[1, length, width]`` record), forgotten here once taken (``LLM.collective_rpc``)."""
        return _on_wire(self.sae_state.recording.take(request_ids))

    def sae_compile_take_keyed_records(self, keys: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
        """``sae_compile_take_records`` of the requests that named ``keys`` (``extra_args["sae_record_key"]``), by key."""
        return _on_wire(self.sae_state.recording.take_keyed(keys))

    def sae_compile_stats(self) -> dict[str, Any]:
        """What this worker's steering holds: for tests and monitoring (``LLM.collective_rpc``)."""
        requests = self.sae_state.requests
        return {
            "graphs_rewritten": self.sae_pass.graphs,
            "unique_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            "requests": len(requests.requests),
            "rows_in_use": requests.rows_in_use(),
            "records_held": self.sae_state.recording.held,
            "handles": self.sae_state.handles,
        }


def _on_wire(taken: dict[Any, dict[str, FeatureRecord]]) -> dict[Any, dict[str, dict[str, Any]]]:
    return {owner: {name: record_to_wire(record) for name, record in sites.items()} for owner, sites in taken.items()}
