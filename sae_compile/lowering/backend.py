"""The compile backend: find the attached sites in the Dynamo graph, rewrite, then hand the
graph to the inner backend (Inductor by default, or any registered Dynamo backend).

The backend owns compile concerns only; the rewrite and the site search see just a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .graph_sites import find_site_nodes
from .rewrite import insert_steering_ops
from .sites import DecoderLayout, Site

InnerBackend = str | Callable[..., Any]


def resolve_inner_backend(backend: InnerBackend, mode: str | None, options: dict[str, Any] | None) -> Callable:
    """A callable ``(gm, example_inputs) -> compiled`` for ``backend``, honouring Inductor's
    ``mode``/``options`` the way ``torch.compile`` does."""
    if backend == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**list_mode_options(mode or "default"), **(options or {})}

        def inductor(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
            return compile_fx(gm, example_inputs, config_patches=patches)

        return inductor
    if mode is not None or options:
        raise ValueError(
            f"steer(): mode= and options= configure Inductor, but backend={backend!r}. "
            "Drop them, or use backend='inductor'."
        )
    if isinstance(backend, str):
        return torch._dynamo.lookup_backend(backend)
    if callable(backend):
        return backend
    raise TypeError(f"steer(): backend must be a backend name or a callable, got {type(backend).__name__}.")


class SteeringBackend:
    """Dynamo backend that inserts ``sae_compile::steer`` at ``handles``' sites.

    With ``fullgraph=True`` there is one graph, and a site missing from it is an error at
    once. Otherwise Dynamo hands over one fragment per graph break, and a site may sit in
    any of them: the backend records what it placed, and ``check_placed`` (run by the
    caller after each call that compiled something) raises for sites no fragment held.
    ``on_graph``, if given, sees every rewritten graph (tests use it to count op nodes).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: DecoderLayout,
        handles: dict[Site, str],
        inner: Callable,
        on_graph: Callable[[fx.GraphModule], None] | None = None,
        fullgraph: bool = True,
    ) -> None:
        self.model = model
        self.layout = layout
        self.handles = handles
        self.inner = inner
        self.on_graph = on_graph
        self.fullgraph = fullgraph
        self.compiles = 0
        self.placed: set[Site] = set()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        nodes = find_site_nodes(gm.graph, self.model, self.layout)
        here = {site: (nodes[site], handle) for site, handle in self.handles.items() if site in nodes}
        self.compiles += 1
        self.placed |= set(here)
        if self.fullgraph:
            _raise_if_missing(site for site in self.handles if site not in here)
        insert_steering_ops(gm, here)
        if self.on_graph is not None:
            self.on_graph(gm)
        return self.inner(gm, example_inputs)

    def check_placed(self) -> None:
        """Raise if an attached site is in none of the graphs compiled so far."""
        _raise_if_missing(site for site in self.handles if site not in self.placed)


def _raise_if_missing(sites: Iterable[Site]) -> None:
    missing = sorted(site.name for site in sites)
    if missing:
        raise RuntimeError(
            f"sae_compile could not find sites {missing} in the captured graph, so steering there "
            "would be silently skipped. This happens when the forward has graph breaks inside the "
            "decoder layers; compile with fullgraph=True to see where."
        )


def _trampoline(*args: Any, **kwargs: Any) -> Any:
    return __target__(*args, **kwargs)  # noqa: F821 - bound in the globals of each copy


def fresh_entry_point(fn: Callable, tag: str) -> Callable:
    """A function that calls ``fn``, with a code object of its own.

    Dynamo keeps its compiled-code cache, and its recompile limit, per code object. Every
    instance of an HF model class shares ``forward.__code__``, so compiling it directly
    would make steered models (and plain ``torch.compile`` users) of one class share one
    limit of 8 entries. Tracing through a private trampoline gives each compiled model its
    own cache, and the inlined ``forward`` is traced exactly as before.
    """
    code = _trampoline.__code__.replace(co_name=f"sae_compile_{tag}")
    scope = {"__target__": fn, "__builtins__": __builtins__}
    entry = type(_trampoline)(code, scope, code.co_name)
    entry.__wrapped__ = fn
    return entry
