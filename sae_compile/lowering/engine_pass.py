"""The rewrite as an Inductor post-grad pass, for engines that own their compile backend.

A serving engine (vLLM) compiles its model itself and admits our rewrite only as a
``post_grad_custom_post_pass``. There no graph input can be added, which is why the op finds
its state through a site handle: the pass inserts ``steer(x, handle)`` on the nodes that
``engine_sites`` finds, and nothing else about the graph changes.

``uuid()`` is what Inductor's FX graph cache keys the pass by. It encodes what is placed where
(every site and its handle), so a graph compiled with other sites, or for another engine's
state, never comes back from the cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from torch import fx, nn
from torch._inductor.custom_graph_pass import CustomGraphPass

from .engine_sites import find_engine_sites
from .rewrite import insert_into_graph
from .sites import Site

# Bumped whenever placement or the rewrite changes what a pass produces.
_VERSION = "sae_compile.engine_pass.v1"


class EngineSteeringPass(CustomGraphPass):
    """Insert ``sae_compile::steer`` at the attached sites of a token-major decoder graph.

    The pass exists before the model does (engines read their compile options when they
    construct the model), so ``bind`` gives it the decoder layers, the hidden size and the
    handle of each attached site (TransformerLens name -> handle of a registered site state)
    once the engine has built the model and the state. ``graphs`` counts rewritten graphs.
    """

    def __init__(self) -> None:
        self._layers: tuple[nn.Module, ...] | None = None
        self._hidden_size = 0
        self._handles: dict[Site, str] = {}
        self.graphs = 0

    def bind(self, layers: Sequence[nn.Module], hidden_size: int, handles: dict[str, str]) -> None:
        """Place ``handles``' sites on graphs of the model whose decoder layers are ``layers``."""
        self._layers = tuple(layers)
        self._hidden_size = hidden_size
        self._handles = {_site(name): handle for name, handle in handles.items()}

    def __call__(self, graph: fx.Graph) -> None:
        if self._layers is None:
            raise RuntimeError("sae_compile: the steering pass ran before bind() gave it the model's layers.")
        found = find_engine_sites(graph, self._layers, self._hidden_size)
        missing = [site.name for site in self._handles if site not in found]
        if missing:
            raise ValueError(f"sae_compile: sites {missing} are not in this model's graph.")
        insert_into_graph(graph, {site: ((found[site],), handle) for site, handle in self._handles.items()})
        graph.lint()
        self.graphs += 1

    def uuid(self) -> str:
        placed = "\0".join(f"{site.name}={handle}" for site, handle in sorted(self._handles.items()))
        return hashlib.sha256(f"{_VERSION}\0{placed}".encode()).hexdigest()


def _site(name: str) -> Site:
    site = Site.parse(name)
    if site is None:
        raise ValueError(f"sae_compile: {name!r} is not a site name such as 'blocks.3.hook_resid_post'.")
    return site
