"""The one opaque op that steering lowers to: ``torch.ops.sae_compile.steer``.

``steer(x, site) -> Tensor``

- ``x``: a residual-stream tensor ``[batch, seq, d_model]``.
- ``site``: the handle of a registered ``SiteState`` (see ``runtime.state``). All steering
  state (SAE weights, per-row tables, routing) is read through it at run time.

Aliasing and mutation: the output is always a fresh, contiguous tensor with ``x``'s shape,
dtype and device, never a view of ``x`` (the fake implementation returns the same); the op
mutates none of its arguments and none of the state it reads. It performs no host sync on
CUDA and allocates only sizes fixed by ``x``'s shape.

State: the op assumes that the state behind ``site`` does not change while one graph runs.
Writes (admission, batch assignment, hot swaps) happen between forwards; ``SteeredModel``
serialises them with its calls. A compiled graph may therefore read the state at any point
of its run, and a captured CUDA graph reads whatever the last write left.

There is no autograd formula: steering is for inference (``torch.no_grad()``).
"""

from __future__ import annotations

import torch

from ..runtime.state import lookup_site
from .kernels.steer import steer_site

_LIBRARY = torch.library.Library("sae_compile", "FRAGMENT")
# The low-level Library API rather than torch.library.custom_op: the same contract, a
# third of the per-call dispatch cost, which matters on the decode path.
_LIBRARY.define("steer(Tensor x, str site) -> Tensor")


def _steer(x: torch.Tensor, site: str) -> torch.Tensor:
    return steer_site(x, lookup_site(site))


_LIBRARY.impl("steer", _steer, "CompositeExplicitAutograd")


@torch.library.register_fake("sae_compile::steer", lib=_LIBRARY)
def _(x: torch.Tensor, site: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


STEER_OP = torch.ops.sae_compile.steer.default
