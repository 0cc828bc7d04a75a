"""Capturing a steered forward in CUDA graphs by hand.

``torch.compile(mode="reduce-overhead")`` (``sc.steer(..., mode="reduce-overhead")``) does
this automatically, with every steering path in each graph. Engines that manage their own
graphs capture ``SteeredModel.step``: it routes tokens on the device and reads only static
steering state, so one capture keeps serving while requests join, leave and change
steering through ``steered.slots``.

A graph holds the paths declared for its capture (``Paths``), whatever rows a replay is
given. ``StepGraphs`` captures one graph per declared path set and replays, per step, the
cheapest one that holds every path the current assignment needs: a batch of additive
steering does not pay for Reconstruct's full encode, and recording features costs only in
the steps that record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from .state import STEERING_PATHS, Paths, capture_paths


def capture(
    fn: Callable[[], Any], *, warmup: int = 3, reset: Callable[[], None] | None = None, paths: Paths = STEERING_PATHS
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call of it holding ``paths``.

    The warmup runs the paths the capture will hold (``capture_paths``), so no kernel is
    compiled or initialised for the first time inside the captured region.

    Returns the graph and ``fn``'s output from the capture, whose tensors are the static
    outputs every ``graph.replay()`` rewrites. ``reset`` runs after the warmup and after
    the capture, to undo what the runs did to stateful inputs (``StaticCache.reset``).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), capture_paths(paths):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), capture_paths(paths):
        output = fn()
    if reset is not None:
        reset()
    return graph, output


def path_cost(paths: Paths) -> tuple[bool, bool, bool, bool]:
    """A sort key, cheapest first: recording and the full path encode every token of the
    batch in a captured graph; the sparse delta reads a few features; the additive step is
    one fused add."""
    return paths.record, paths.full, paths.sparse, paths.add


def cheapest_covering(path_sets: Sequence[Paths], needed: Paths) -> int:
    """The index of the cheapest of ``path_sets`` that covers ``needed`` (``path_cost``).
    ValueError, naming what is missing, when none does."""
    covering = [i for i, paths in enumerate(path_sets) if paths.covers(needed)]
    if not covering:
        raise ValueError(
            f"no captured graph holds the paths this step needs ({needed}); the graphs hold "
            f"{list(path_sets)}. Capture one with those paths, or assign rows that fit."
        )
    return min(covering, key=lambda i: path_cost(path_sets[i]))


class StepGraphs:
    """CUDA graphs of one step function, one per declared path set, chosen per replay.

    ``needed()`` says which paths the next step needs (``SteeredModel.needed_paths``), read on
    the host from the assignment; ``replayed(paths)`` is told which graph ran, so that what it
    recorded can be collected. A replay holds ``lock`` (the model's), so no state write lands
    between the choice and the replay. Build it with ``SteeredModel.capture_steps``.
    """

    def __init__(
        self,
        graphs: Sequence[tuple[Paths, torch.cuda.CUDAGraph, Any]],
        needed: Callable[[], Paths],
        replayed: Callable[[Paths], None],
        lock: AbstractContextManager,
    ) -> None:
        self._paths = [paths for paths, _, _ in graphs]
        self._graphs = [(graph, output) for _, graph, output in graphs]
        self._needed = needed
        self._replayed = replayed
        self._lock = lock

    @property
    def path_sets(self) -> list[Paths]:
        """The declared path set of each graph, in capture order."""
        return list(self._paths)

    def replay(self) -> Any:
        """Replay the cheapest graph that serves the current assignment; returns its static
        output (rewritten by every replay of that graph). ValueError, before anything runs,
        when no graph holds the paths the step needs."""
        with self._lock:
            chosen = cheapest_covering(self._paths, self._needed())
            graph, output = self._graphs[chosen]
            graph.replay()
            self._replayed(self._paths[chosen])
        return output
