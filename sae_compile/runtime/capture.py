"""Capturing a steered forward in a CUDA graph by hand.

``torch.compile(mode="reduce-overhead")`` (``sc.steer(..., mode="reduce-overhead")``) does
this automatically. Engines that manage their own graphs capture ``SteeredModel.step``:
it routes tokens on the device and reads only static steering state, so one capture keeps
serving while requests join, leave and change steering through ``steered.slots``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .state import every_path


def capture(
    fn: Callable[[], Any], *, warmup: int = 3, reset: Callable[[], None] | None = None
) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream, then capture one call of it.

    The warmup runs every steering path the capture will contain (``every_path``), so no
    kernel is compiled or initialised for the first time inside the captured region.

    Returns the graph and ``fn``'s output from the capture, whose tensors are the static
    outputs every ``graph.replay()`` rewrites. ``reset`` runs after the warmup and after
    the capture, to undo what the runs did to stateful inputs (``StaticCache.reset``).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), every_path():
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        output = fn()
    if reset is not None:
        reset()
    return graph, output
