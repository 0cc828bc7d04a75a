"""One site's steering: which paths run, in which order, on which implementation.

Per token ``x`` of a steered row ``r``, in this order (DESIGN §4):

1. additive:  ``x <- x + add_vec[r]``
2. SAE edits with clamped features ``i`` becoming ``mul_i * f_i + shift_i``:
   - delta rows:        ``x <- x + sum_i (f'_i - f_i) W_dec[i]``   (error term kept)
   - reconstruct rows:  ``x <- f' @ W_dec + b_dec``                (error term dropped)

Delta rows of an elementwise SAE (ReLU/JumpReLU) only need the clamped features, so they
cost O(K·D) per token (the *sparse* path). Reconstruct rows and TopK SAEs need every
feature (the *full* path), computed only for the tokens that need it. Tokens that are not
steered come back bit-for-bit.

An SAE with ``layer_norm_input`` (OpenAI's TopK autoencoders) runs step 2 on
``x_n, mu, std = LN(x)`` (after step 1, which stays in the stream's own space): the same
paths steer ``x_n`` to ``y_n``, and ``torch_path.layer_norm_out`` maps that back, delta rows
to ``x + std * (y_n - x_n)`` (``std * (f' - f) @ W_dec``, what their decode gives) and
reconstruct rows to ``y_n * std + mu``. Sites whose SAE does not normalise never run it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ...runtime.state import STEERING_PATHS, Paths, SiteState, declared_paths
from . import record, torch_path, triton_sae


def steer_site(x: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Steer ``x`` with the rows and edits ``site`` currently holds; returns a new, contiguous tensor.

    ``x`` is ``[B, S, D]`` (each batch row routed to a steering row) or token-major
    ``[N, D]`` (each token routed to its own row, as an engine's flattened batch is). An ``x``
    in another dtype than the site's (an engine that adds the residual stream in fp32) is
    steered in the site's dtype, and its unsteered tokens come back exactly.
    """
    if site.broken is not None:
        raise RuntimeError(f"sae_compile: {site.broken}; call load_sae() again with a valid SAE to repair it.")
    paths, static = _paths(x, site, x.shape[0])
    if not (paths.add or paths.sparse or paths.full or paths.record):
        # Nothing is steered or recorded here (an idle step): the output is x, copied, so that it
        # stays a fresh tensor in the fake's layout. Decided on the host, from the same mirrors as
        # the paths: never under capture, which runs the paths declared for it.
        return x.clone(memory_format=torch.contiguous_format)
    if x.dim() == 2:
        return _steer_tokens(x, site, paths, static)
    batch, seq, _ = x.shape
    if paths.record:
        record.record_site(x, site, site.routing.valid(batch, seq), static)
    return _steer_rows(x, site, *site.routing.view(batch, seq), paths)


def _steer_tokens(x: torch.Tensor, site: SiteState, paths: Paths, static: bool) -> torch.Tensor:
    """Token-major ``x [N, D]``: a batch of ``N`` one-token rows, each with its token's row
    (and, when recording, each token a row of the record plan)."""
    tokens, d = x.shape
    rows, mask, weight = site.routing.view_tokens(tokens)  # [N], [N, 1], [N, 1]
    stream = x.to(site.dtype).view(tokens, 1, d)  # [N, 1, D]; x itself in the site's dtype
    if paths.record:
        record.record_site(stream, site, site.routing.valid(tokens, 1), static)
    steered = _steer_rows(stream, site, rows, mask, weight, paths).view(tokens, d)
    if x.dtype == site.dtype:
        return steered
    return torch.where(mask, steered.to(x.dtype), x)


def _steer_rows(
    x: torch.Tensor, site: SiteState, rows: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, paths: Paths
) -> torch.Tensor:
    """``x [B, S, D]`` with batch row ``b`` using steering row ``rows[b]`` on the tokens of ``mask``."""
    source = x
    x = x.contiguous()  # [B, S, D]; every path below returns x's layout
    if site.layer_norm_input and (paths.sparse or paths.full):
        out = _steer_layer_normed(x, site, rows, mask, weight, paths)
    else:
        out = _steer_paths(x, site, rows, mask, weight, paths)
    return x.clone() if out is source else out


def _steer_layer_normed(
    x: torch.Tensor, site: SiteState, rows: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, paths: Paths
) -> torch.Tensor:
    """Steering at a site whose SAE layer-normalises its input (see the module docstring)."""
    if paths.add:
        x = torch_path.add_vector(x, rows, weight, site)  # [B, S, D], in the stream's space
    x_n, mu, std = torch_path.layer_norm_in(x)  # [B, S, D] model dtype, [B, S, 1] fp32 each
    y_n = _steer_paths(x_n, site, rows, mask, weight, replace(paths, add=False))  # [B, S, D], a new tensor
    reconstruct = mask & site.reconstruct_row[rows][:, None]  # [B, S]
    return torch_path.layer_norm_out(x, x_n, y_n, mu, std, reconstruct, mask)


def _steer_paths(
    x: torch.Tensor, site: SiteState, rows: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, paths: Paths
) -> torch.Tensor:
    """The additive step, the sparse delta and the full path on ``x [B, S, D]``, each where ``paths``
    says, fused on CUDA; returns ``x`` itself when none runs."""
    fused = _use_triton(x)
    out = x
    if fused and paths.sparse:
        out = triton_sae.sparse_delta(out, rows, mask, site, with_add=paths.add)
    else:
        if paths.add:
            out = torch_path.add_vector(out, rows, weight, site)
        if paths.sparse:
            out = torch_path.sparse_delta(out, rows, weight, site)
    if paths.full and fused:
        out = triton_sae.full_path(out, rows, mask, site, in_place=out is not x)
    elif paths.full:
        out = torch_path.full_path(out, rows, mask, site)
    return out


def _use_triton(x: torch.Tensor) -> bool:
    """The fused kernels run on CUDA tensors of the dtypes they take, when Triton is installed."""
    return x.is_cuda and triton_sae.TRITON_AVAILABLE and x.dtype in triton_sae.DTYPES


def _paths(x: torch.Tensor, site: SiteState, batch: int) -> tuple[Paths, bool]:
    """The paths to run, and whether they must be static: decided by nothing a replay would
    not see. The host knows which paths the assigned rows need. A captured graph holds the
    paths declared for it (``capture_paths``; every steering path for an undeclared capture,
    as CUDA graph trees make), whatever rows a replay is given, and so does the warmup before it."""
    declared = declared_paths()
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        site.note_capture()
        if declared is None:
            _refuse_undeclared_recording(site)
            declared = STEERING_PATHS
    if declared is not None:
        return site.paths_within(declared), True
    return site.live_paths(batch), False


def _refuse_undeclared_recording(site: SiteState) -> None:
    if site.recorder is not None and site.recorder.plan is not None:
        raise RuntimeError(
            f"sae_compile: {site.name} records features inside a CUDA graph captured without declared paths "
            "(mode='reduce-overhead', or a bare torch.cuda.graph), which holds no record path: its replays "
            "would not record. Capture with SteeredModel.capture_steps and sc.Paths(record=True), or record "
            "without CUDA graphs."
        )
