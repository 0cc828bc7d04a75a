"""Serve steered models with vLLM: per-request SAE steering inside vLLM's compiled graph.

- ``LLM(model, saes={site: SAE or path}, ...)`` builds a ``vllm.LLM`` whose compiled graph carries
  ``sae_compile::steer`` at the given sites (TransformerLens names, as for ``sc.steer``).
- ``sampling_params(steering, record=[...], **kw)`` is a ``vllm.SamplingParams`` carrying
  ``steering`` for one request, as JSON text in ``extra_args["sae_steering"]``
  (``Steering.to_json``), which is what clients of ``sae-compile serve`` send as ``vllm_xargs``,
  and the features it records (``sc.Features``; ``extra_args["sae_record"]``), which its
  finished output carries as ``output.features`` (an ``LLM`` built with ``max_top_k``).

Nothing else in ``sae_compile`` imports this package or vLLM.
"""

try:
    import vllm  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        'sae_compile.vllm needs vLLM. Install it with: pip install "sae-compile[vllm]"'
    ) from error

from .offline import LLM, sampling_params
from .spec import RECORD_KEY, STEERING_KEY

__all__ = ["LLM", "RECORD_KEY", "STEERING_KEY", "sampling_params"]
