"""The SAE activations of DESIGN §4, in place on a fresh pre-activation tensor.

One definition for every torch caller (``SAE.encode`` and the torch steering path), so
they fire the same features. JumpReLU follows SAELens, ``relu(pre) * (pre > threshold)``,
for thresholds of either sign; TopK keeps the ``k`` largest of ``relu(pre)``, lower
indices winning ties. ``layer_norm`` is the input normalisation of OpenAI's TopK autoencoders,
``sc.SAE(..., layer_norm_input=True)``. This module imports only torch.
"""

from __future__ import annotations

from typing import Literal

import torch

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")
#: The epsilon of ``layer_norm``, as in OpenAI's ``sparse_autoencoder/model.py`` (and SAELens's "layer_norm").
LAYER_NORM_EPS = 1e-5


def layer_norm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_n, mu, std)`` for ``x [..., D]``, OpenAI's ``LN`` (``sparse_autoencoder/model.py``):
    ``mu`` the mean over the last dim, ``std`` torch's default (unbiased, ``D - 1``) standard deviation
    of ``x - mu``, and ``x_n = (x - mu) / (std + eps)``. ``mu`` and ``std`` are ``[..., 1]``; undoing
    the normalisation is ``x_n * std + mu``, with ``std`` and not ``std + eps``, as their decode does."""
    mu = x.mean(dim=-1, keepdim=True)  # [..., 1]
    centred = x - mu  # [..., D]
    std = centred.std(dim=-1, keepdim=True)  # [..., 1]
    return centred / (std + LAYER_NORM_EPS), mu, std


def activate_(
    pre: torch.Tensor, activation: str, threshold: torch.Tensor | None = None, k: int | None = None, *, static: bool = False
) -> torch.Tensor:
    """``act(pre)`` in place and returned: ReLU, JumpReLU with ``threshold [F]`` (broadcast
    against ``pre [..., F]``), or TopK with ``k``. ``pre`` must not be needed afterwards.
    ``static``: read nothing back on the host (see ``top_k_indices``)."""
    if activation == "topk":
        return keep_top_k_(pre.relu_(), k, static=static)
    if activation == "jumprelu":
        return jumprelu_(pre, threshold)
    return pre.relu_()


def jumprelu_(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """SAELens's JumpReLU ``relu(pre) * (pre > threshold)``, in place and returned.

    Computed as ``pre * (pre > max(threshold, 0))``, which is the same number for every
    ``pre`` and threshold sign: one 0/1 mask product over ``pre`` and no separate ReLU pass.
    A float mask rather than ``where`` because on the CPU, ops that read or write bool
    tensors (``where``, ``masked_fill_``) cost about as much as the encode matmul itself.
    """
    mask = torch.gt(pre, threshold.clamp(min=0), out=torch.empty_like(pre))
    return pre.mul_(mask)


def keep_top_k_(f: torch.Tensor, k: int, *, static: bool = False) -> torch.Tensor:
    """Zero all but the ``k`` largest of the non-negative ``f [..., F]`` (ties as ``top_k_indices``), in place."""
    top = top_k_indices(f, k, static=static)  # [..., k]
    values = f.gather(-1, top)  # [..., k]
    return f.zero_().scatter_(-1, top, values)


def top_k_indices(f: torch.Tensor, k: int, *, static: bool = False) -> torch.Tensor:
    """Indices ``[..., k]`` of the ``k`` largest of the non-negative ``f [..., F]``; at a tie on
    the k-th value, the lower indices win.

    ``torch.topk`` leaves ties to the implementation (its CPU kernels alone differ by size),
    and a TopK SAE in bf16 ties often. The rule is fixed so that every path, on every
    device, fires the same features: each value is ranked by a 64-bit key, its float bits
    (which order non-negative floats as the floats) above its reversed index. ``static``
    skips the CPU's shortcut, which reads a flag back: a forward that a captured graph
    replays (``capture_paths``) must not decide anything from the data on the host.
    """
    features = f.shape[-1]
    if not (f.is_cuda or static) and k < features:
        # torch.topk picks the rule's features unless a tie straddles the k-th place; on the
        # CPU checking that costs no sync, and skips the keys, which are 4x slower to rank.
        top = f.topk(k + 1, dim=-1)
        if not bool((top.values[..., k - 1] == top.values[..., k]).any()):
            return top.indices[..., :k]
    bits = f.float().view(torch.int32) & 0x7FFFFFFF  # -0.0 ranks as 0.0
    reversed_index = torch.arange(features - 1, -1, -1, device=f.device)  # [F]
    keys = (bits.to(torch.int64) << 32) | reversed_index  # [..., F]
    return keys.topk(k, dim=-1, sorted=False).indices
