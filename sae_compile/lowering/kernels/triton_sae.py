"""Triton kernels for one site's SAE steering, equal to the torch path (DESIGN §4) without its costs.

- ``sparse_delta``: the delta path of ReLU/JumpReLU rows, one fused kernel. A program takes 16
  tokens of one batch row: it encodes them with the ``C`` clamped features' encoder rows
  (pre-gathered per steering row), applies the clamps, and decodes the delta with their ``C``
  decoder rows. O(C·D) per token, no [N, F] buffer. With ``with_add`` it also does the
  additive step first, as ``steer_site`` does.
- ``full_path``: Reconstruct rows and TopK SAEs. A one-program device-side partition lists the
  full-path tokens; the encode GEMM, the TopK select, the decode GEMM and the output run over
  that list in fixed-size chunks, on grids sized for a whole chunk, and tiles past the
  device-held count exit at once, so only those tokens cost FLOPs and scratch stays O(chunk·F).
  A TopK token's decode reads only its k decoder rows.
  It can write in place, so after the sparse kernel no further copy of the unsteered tokens
  is made.

Both follow the op contract (DESIGN §5): no host sync, no data-dependent sizes, launches on
the current stream, so they can sit inside a captured CUDA graph. Products accumulate in fp32.
Pre-activations are rounded to the model dtype where the torch path's matmuls round them, so
both paths fire the same JumpReLU features; the rest stays in fp32 until the output.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (how the CPU test tier checks
them); the library's CPU path is ``torch_path`` and never comes here.
The module imports without triton: ``TRITON_AVAILABLE`` says whether the kernels exist.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple

import torch

from ...runtime.state import SiteState
from . import torch_path

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional, GPU-only dependency
    triton = None

TRITON_AVAILABLE: bool = triton is not None

# Tile sizes. ``tl.dot`` needs every dimension >= 16.
_BLOCK_T = 16  # tokens per sparse-delta program (they share a batch row, so a steering row)
_BLOCK_N = 64  # output columns per GEMM tile
_BLOCK_K = 64  # reduction step of the GEMMs
_MAX_BLOCK_D = 512  # widest chunk of the per-token loops over the hidden size: few, wide loads
_PARTITION_MIN = 128  # smallest block of the one-program partition (it is next_pow2(N) above that)
_TOPK_BLOCK = 512  # features per step of the TopK select, each compared against 16 digits
_TOPK_WARPS = 8  # for the [_TOPK_BLOCK, 16] comparisons: 32 per thread
_GATHER_BLOCK_J = 16  # decoder rows per step of the TopK decode
_GATHER_BLOCK_D = 128  # hidden dims per TopK-decode program: enough programs for a few tokens
# Lowest bit of a value's fp32 bits that its storage dtype can set (bf16 keeps 7 mantissa bits
# of fp32's 23, fp16 10): the TopK select never looks below it.
_LOW_KEY_BIT = {torch.float32: 0, torch.bfloat16: 16, torch.float16: 13}
#: Model dtypes the kernels take; others (float64) go to the torch path.
DTYPES: frozenset[torch.dtype] = frozenset(_LOW_KEY_BIT)

# The sizes that bound loops (D, F, C) are compile-time constants: they are fixed per site, so
# that costs one compile per site, and the interpreter (Triton 3.6 with NumPy 2) cannot loop to
# a runtime bound. The sequence length varies per call and stays a runtime argument.


if TRITON_AVAILABLE:

    @triton.jit
    def _sparse_delta_kernel(
        x_ptr, out_ptr, rows_ptr, mask_ptr, add_vec_ptr, enc_ptr, dec_ptr, params_ptr,
        seq,
        d_model: tl.constexpr, C: tl.constexpr, WITH_ADD: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per ``BLOCK_T`` consecutive tokens of one batch row; see ``sparse_delta``."""
        dtype = out_ptr.dtype.element_ty
        batch_row = tl.program_id(0).to(tl.int64)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] positions in the row
        t_on = offs_t < seq
        token = batch_row * seq + offs_t  # [BLOCK_T] int64
        row = tl.load(rows_ptr + batch_row)  # the tile's steering row
        steered = (tl.load(mask_ptr + token, mask=t_on, other=0) != 0) & t_on  # [BLOCK_T]
        # A tile with no steered token reads no table: its loads below are all masked off.
        live_c = tl.where(tl.max(steered.to(tl.int32), axis=0) > 0, C, 0)
        offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_on = offs_c < live_c  # [BLOCK_C]
        enc_rows = enc_ptr + row * C * d_model  # sparse_enc[row] [C, D]
        dec_rows = dec_ptr + row * C * d_model  # sparse_dec[row] [C, D]
        add_row = add_vec_ptr + row * d_model

        # Pass 1: pre-activations of the C clamped features, from x after the additive step.
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)  # [BLOCK_T, BLOCK_C]
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < d_model
            xs = tl.load(x_ptr + token[:, None] * d_model + offs_d[None, :],
                         mask=steered[:, None] & d_on[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            if WITH_ADD:
                # The encoder sees x + v rounded to the model dtype, as in the torch path.
                v = tl.load(add_row + offs_d, mask=d_on, other=0.0).to(tl.float32)  # [BLOCK_D]
                xs = (xs.to(tl.float32) + v[None, :]).to(dtype)
            w = tl.load(enc_rows + offs_c[None, :] * d_model + offs_d[:, None],
                        mask=c_on[None, :] & d_on[:, None], other=0.0)  # [BLOCK_D, BLOCK_C]
            if DOT_F32:
                # CPU tensors mean the interpreter, which keeps bf16 as raw bits and cannot multiply them.
                xs = xs.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(xs, w, acc, input_precision=PRECISION)
        params = params_ptr + row * 4 * C  # sparse_params[row] [4, C] fp32
        b_enc = tl.load(params + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        theta = tl.load(params + C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        mul_m1 = tl.load(params + 2 * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        shift = tl.load(params + 3 * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        pre = acc.to(dtype).to(tl.float32) + b_enc[None, :]  # [BLOCK_T, BLOCK_C]; x @ enc at model precision
        f = tl.where(pre > theta[None, :], tl.maximum(pre, 0.0), 0.0)  # SAELens's JumpReLU (theta = 0: ReLU)
        # f' - f, rounded to the model dtype as the torch path's decode matmul takes it; 0 on
        # unused slots and on rows that are not sparse delta rows.
        coef = (shift[None, :] + f * mul_m1[None, :]).to(dtype)  # [BLOCK_T, BLOCK_C]
        if DOT_F32:
            coef = coef.to(tl.float32)

        # Pass 2: out = (x [+ v]) + coef @ dec; unsteered tokens are copied bit for bit.
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < d_model
            tile = token[:, None] * d_model + offs_d[None, :]  # [BLOCK_T, BLOCK_D]
            tile_on = t_on[:, None] & d_on[None, :]
            x_raw = tl.load(x_ptr + tile, mask=tile_on, other=0.0)  # [BLOCK_T, BLOCK_D] model dtype
            base = x_raw.to(tl.float32)
            if WITH_ADD:
                v = tl.load(add_row + offs_d, mask=d_on, other=0.0).to(tl.float32)  # [BLOCK_D]
                base = (base + v[None, :]).to(dtype).to(tl.float32)
            w = tl.load(dec_rows + offs_c[:, None] * d_model + offs_d[None, :],
                        mask=c_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
            if DOT_F32:
                w = w.to(tl.float32)
            delta = tl.dot(coef, w, input_precision=PRECISION)  # [BLOCK_T, BLOCK_D] fp32
            tl.store(out_ptr + tile, tl.where(steered[:, None], (base + delta).to(dtype), x_raw), mask=tile_on)

    @triton.jit
    def _partition_kernel(
        mask_ptr, rows_ptr, full_row_ptr, reconstruct_row_ptr, token_ptr, bounds_ptr,
        n, seq,
        BLOCK: tl.constexpr,
    ):
        """One program: the full-path tokens in slot order, and the group ends; see ``_partition``."""
        offs = tl.arange(0, BLOCK)  # [BLOCK] tokens
        on = offs < n
        row = tl.load(rows_ptr + offs // seq, mask=on, other=0)  # [BLOCK]
        full = (tl.load(mask_ptr + offs, mask=on, other=0) != 0) & (tl.load(full_row_ptr + row, mask=on, other=0) != 0)
        recon = full & (tl.load(reconstruct_row_ptr + row, mask=on, other=0) != 0)  # [BLOCK]
        delta = full & (recon == 0)  # [BLOCK]
        n_recon = tl.sum(recon.to(tl.int32), axis=0)
        slot = tl.where(recon, tl.cumsum(recon.to(tl.int32), axis=0), n_recon + tl.cumsum(delta.to(tl.int32), axis=0)) - 1
        tl.store(token_ptr + slot, offs.to(tl.int64), mask=full)
        tl.store(bounds_ptr, n_recon.to(tl.int64))
        tl.store(bounds_ptr + 1, (n_recon + tl.sum(delta.to(tl.int32), axis=0)).to(tl.int64))

    @triton.jit
    def _encode_kernel(
        x_ptr, token_ptr, bounds_ptr, w_enc_ptr, b_enc_ptr, threshold_ptr, f_ptr,
        chunk_start, n_slots,
        d_model: tl.constexpr, d_sae: tl.constexpr,
        TOPK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``f[m] = act(x[token[chunk_start + m]] @ W_enc + b_enc)`` for the chunk's slots
        ``chunk_start + m < bounds[1]`` (the full-path tokens).

        For TopK the activation here is only the ReLU; ``_topk_kernel`` keeps the k largest.
        """
        dtype = f_ptr.dtype.element_ty
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        count = tl.minimum(tl.load(bounds_ptr + 1) - chunk_start, n_slots)  # this chunk's full-path slots
        if pid_m * BLOCK_M >= count:
            return  # the grid covers a whole chunk; tiles past the steered tokens do nothing
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M] slots of the chunk
        m_on = offs_m < count
        token = tl.load(token_ptr + chunk_start + offs_m, mask=m_on, other=0)  # [BLOCK_M] int64
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N] features
        n_on = offs_n < d_sae
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        for k0 in range(0, d_model, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_on = offs_k < d_model
            a = tl.load(x_ptr + token[:, None] * d_model + offs_k[None, :],
                        mask=m_on[:, None] & k_on[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_enc_ptr + offs_k[:, None] * d_sae + offs_n[None, :],
                        mask=k_on[:, None] & n_on[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_F32:  # interpreter only, as in _sparse_delta_kernel
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        b_enc = tl.load(b_enc_ptr + offs_n, mask=n_on, other=0.0).to(tl.float32)  # [BLOCK_N]
        pre = (acc + b_enc[None, :]).to(dtype).to(tl.float32)  # [BLOCK_M, BLOCK_N] at model precision
        if TOPK:
            f = tl.maximum(pre, 0.0)  # [BLOCK_M, BLOCK_N]
        else:
            theta = tl.load(threshold_ptr + offs_n, mask=n_on, other=0.0).to(tl.float32)  # [BLOCK_N]
            f = tl.where(pre > theta[None, :], tl.maximum(pre, 0.0), 0.0)  # [BLOCK_M, BLOCK_N] relu(pre) * (pre > theta)
        tl.store(f_ptr + offs_m[:, None] * d_sae + offs_n[None, :], f.to(dtype), mask=m_on[:, None] & n_on[None, :])

    @triton.jit
    def _topk_kernel(
        f_ptr, idx_ptr, bounds_ptr,
        chunk_start,
        d_sae: tl.constexpr, K: tl.constexpr, LOW_BIT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per slot of the chunk: keep the ``K`` largest of the ReLU'd ``f[m]`` in place,
        zero the rest, and list the kept features in ``idx[m]`` in feature order; at a tie on the
        K-th value the lower features win (as ``top_k_indices``).

        A radix select on the float bits, which order non-negative floats as the floats: each
        pass fixes the next 4 bits of the K-th largest key from a 16-bin count of the keys that
        share its bits so far. Bits below ``LOW_BIT`` are 0 for the storage dtype and never read.
        """
        slot = tl.program_id(0)
        if chunk_start + slot >= tl.load(bounds_ptr + 1):
            return  # only full-path tokens are selected
        row = f_ptr + slot.to(tl.int64) * d_sae
        kept_row = idx_ptr + slot.to(tl.int64) * K
        digits = tl.arange(0, 16)  # [16]
        kth = tl.full((), 0, tl.int32)  # the K-th largest key, 4 bits a pass from the top
        want = tl.full((), K, tl.int32)  # how many keys sharing kth's fixed bits are still to take
        for p in tl.static_range((35 - LOW_BIT) // 4):
            shift = 28 - 4 * p  # p is a compile-time constant: static_range unrolls the passes
            counts = tl.zeros((16,), dtype=tl.int32)  # [16] keys per next digit, among the matching
            for start in range(0, d_sae, BLOCK):
                offs = start + tl.arange(0, BLOCK)  # [BLOCK] features
                on = offs < d_sae
                key = _sort_key(tl.load(row + offs, mask=on, other=0.0))  # [BLOCK] int32
                # Two shifts: one by 32 would be undefined; the keys' top bit is 0, so this gives 0.
                match = on & ((key >> shift >> 4) == (kth >> shift >> 4))  # [BLOCK]
                digit = (key >> shift) & 15  # [BLOCK]
                hit = match[:, None] & (digit[:, None] == digits[None, :])  # [BLOCK, 16]
                counts += tl.sum(hit.to(tl.int32), axis=0)
            at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # [16] keys with digit >= d
            d = tl.max(tl.where(at_least >= want, digits, 0), axis=0)
            want -= tl.sum(tl.where(digits > d, counts, 0), axis=0)
            kth = kth | (d << shift)
        # Keep the keys above kth, and the first ``want`` equal to it in feature order: K in all.
        seen = tl.full((), 0, tl.int32)  # ties met so far
        taken = tl.full((), 0, tl.int32)  # features kept so far
        for start in range(0, d_sae, BLOCK):
            offs = start + tl.arange(0, BLOCK)  # [BLOCK] features
            on = offs < d_sae
            value = tl.load(row + offs, mask=on, other=0.0)  # [BLOCK] model dtype
            key = _sort_key(value)
            tie = on & (key == kth)  # [BLOCK]
            rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)  # [BLOCK] 1-based among the ties
            keep = (key > kth) | (tie & (rank <= want))  # [BLOCK]; off lanes have key 0, never above
            tl.store(row + offs, tl.where(keep, value, tl.zeros_like(value)), mask=on)
            position = taken + tl.cumsum(keep.to(tl.int32), axis=0) - 1  # [BLOCK] in idx[m]
            tl.store(kept_row + position, offs, mask=keep)
            seen += tl.sum(tie.to(tl.int32), axis=0)
            taken += tl.sum(keep.to(tl.int32), axis=0)

    @triton.jit
    def _sort_key(value):
        """Non-negative floats as int32 keys in the same order (-0.0 as 0.0)."""
        return value.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF

    @triton.jit
    def _gather_decode_kernel(
        f_ptr, idx_ptr, bounds_ptr, w_dec_ptr, dec_ptr,
        chunk_start,
        d_model: tl.constexpr, d_sae: tl.constexpr, K: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``dec[0, m] = sum_j f[m, idx[m, j]] * W_dec[idx[m, j]]`` in fp32 for the chunk's slots
        ``chunk_start + m < bounds[0]`` (the Reconstruct tokens): a TopK token's decode reads only
        the K decoder rows it uses, not all F."""
        slot = tl.program_id(0).to(tl.int64)
        if chunk_start + slot >= tl.load(bounds_ptr):
            return  # delta-only tokens need no decode of f
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D] hidden dims
        d_on = offs_d < d_model
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)  # [BLOCK_D]
        for j0 in range(0, K, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
            j_on = offs_j < K
            feat = tl.load(idx_ptr + slot * K + offs_j, mask=j_on, other=0).to(tl.int64)  # [BLOCK_J]
            value = tl.load(f_ptr + slot * d_sae + feat, mask=j_on, other=0.0).to(tl.float32)  # [BLOCK_J]
            w = tl.load(w_dec_ptr + feat[:, None] * d_model + offs_d[None, :],
                        mask=j_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_J, BLOCK_D]
            acc += tl.sum(value[:, None] * w.to(tl.float32), axis=0)
        tl.store(dec_ptr + slot * d_model + offs_d, acc, mask=d_on)

    @triton.jit
    def _decode_kernel(
        f_ptr, bounds_ptr, w_dec_ptr, dec_ptr,
        chunk_start, n_slots,
        d_model: tl.constexpr, d_sae: tl.constexpr, K_SPLIT: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``dec[s, m] = f[m, ks] @ W_dec[ks]`` in fp32, for the chunk's slots ``chunk_start + m < bounds[0]``
        (the Reconstruct tokens), over the ``s``-th ``K_SPLIT`` features ``ks``: split-K partial
        sums, added up in a fixed order by ``_full_output_kernel`` (deterministic, unlike atomics)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        split = tl.program_id(2)
        count = tl.minimum(tl.load(bounds_ptr) - chunk_start, n_slots)  # this chunk's Reconstruct slots
        if pid_m * BLOCK_M >= count:
            return  # delta-only tokens need no dense decode: their f' - f lives on C features
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M] slots
        m_on = offs_m < count
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden dims
        n_on = offs_n < d_model
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        for k0 in range(0, K_SPLIT, BLOCK_K):
            offs_k = (split * K_SPLIT + k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BLOCK_K] features
            k_on = offs_k < d_sae
            a = tl.load(f_ptr + offs_m[:, None] * d_sae + offs_k[None, :],
                        mask=m_on[:, None] & k_on[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_dec_ptr + offs_k[:, None] * d_model + offs_n[None, :],
                        mask=k_on[:, None] & n_on[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_F32:  # interpreter only, as in _sparse_delta_kernel
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        out = dec_ptr + (split * n_slots + offs_m[:, None]) * d_model + offs_n[None, :]
        tl.store(out, acc, mask=m_on[:, None] & n_on[None, :])

    @triton.jit
    def _full_output_kernel(
        out_ptr, rows_ptr, token_ptr, bounds_ptr, f_ptr, dec_ptr, w_dec_ptr, b_dec_ptr,
        clamp_idx_ptr, clamp_mul_ptr, clamp_shift_ptr,
        chunk_start, seq, n_slots,
        d_model: tl.constexpr, d_sae: tl.constexpr, C: tl.constexpr, SPLITS: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per slot of the chunk: apply the clamps and overwrite that full-path token
        (see ``full_path``)."""
        dtype = out_ptr.dtype.element_ty
        slot = tl.program_id(0).to(tl.int64)  # in the chunk; f and dec are per chunk
        if chunk_start + slot >= tl.load(bounds_ptr + 1):
            return  # tokens off the full path keep what ``out`` already holds
        recon = chunk_start + slot < tl.load(bounds_ptr)  # Reconstruct tokens come first
        token = tl.load(token_ptr + chunk_start + slot)
        row = tl.load(rows_ptr + token // seq)
        # Only Reconstruct tokens read the dense decode. (Masks are plain comparisons: some
        # interpreter versions mis-broadcast a scalar bool in `&`.)
        live_dec = tl.where(recon, d_model, 0)
        offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_on = offs_c < C  # [BLOCK_C]
        feat = tl.load(clamp_idx_ptr + row * C + offs_c, mask=c_on, other=0)  # [BLOCK_C] int64
        f = tl.load(f_ptr + slot * d_sae + feat, mask=c_on, other=0.0).to(tl.float32)  # [BLOCK_C]
        mul = tl.load(clamp_mul_ptr + row * C + offs_c, mask=c_on, other=1.0)  # [BLOCK_C]
        shift = tl.load(clamp_shift_ptr + row * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        coef = (mul - 1.0) * f + shift  # [BLOCK_C] = f' - f on the clamped features

        x_row = out_ptr + token * d_model  # read, then overwritten in place, chunk by chunk
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < d_model
            dec_on = offs_d < live_dec
            x_raw = tl.load(x_row + offs_d, mask=d_on, other=0.0)  # [BLOCK_D] model dtype
            dec = tl.zeros((BLOCK_D,), dtype=tl.float32)  # [BLOCK_D] f @ W_dec
            for split in range(SPLITS):
                dec += tl.load(dec_ptr + (split * n_slots + slot) * d_model + offs_d, mask=dec_on, other=0.0)
            b_dec = tl.load(b_dec_ptr + offs_d, mask=dec_on, other=0.0).to(tl.float32)  # [BLOCK_D]
            w = tl.load(w_dec_ptr + feat[:, None] * d_model + offs_d[None, :],
                        mask=c_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
            delta = tl.sum(coef[:, None] * w.to(tl.float32), axis=0)  # [BLOCK_D] (f' - f) @ W_dec
            # Reconstruct: f' @ W_dec + b_dec (error term dropped); delta: x + (f' - f) @ W_dec.
            base = tl.where(recon, dec + b_dec, x_raw.to(tl.float32))  # [BLOCK_D]
            tl.store(x_row + offs_d, (base + delta).to(dtype), mask=d_on)


def sparse_delta(
    x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState, *, with_add: bool = False
) -> torch.Tensor:
    """Error-preserving clamps of an elementwise (ReLU/JumpReLU) SAE; equal to ``torch_path.sparse_delta``.

    ``x [B, S, D]``, ``rows [B]`` (steering row per batch row), ``mask [B, S]`` bool (the tokens
    to steer; ``torch_path`` passes the same mask as a 0/1 ``weight``). Each steered token of
    row ``r`` becomes ``x + sum_c (shift_c + f_c * (mul_c - 1)) * sparse_dec[r, c]`` with
    ``f_c = JumpReLU(x @ sparse_enc[r, c] + b_enc_c)``, from the row's pre-gathered tables
    (all zero for rows that are not sparse delta rows, so those add exactly nothing).
    Unsteered tokens are copied exactly.

    ``with_add=True`` fuses the additive step that ``steer_site`` runs first: steered tokens
    start from ``x + add_vec[r]`` (rounded to the model dtype), and the SAE encodes that.

    Returns a new tensor like ``x``. No host sync; one program per 16 tokens of a batch row,
    which read their row's ``C`` encoder and decoder rows once.
    """
    _require_triton()
    batch, seq, d_model = x.shape
    flat = x.reshape(batch * seq, d_model).contiguous()  # [N, D]
    out = torch.empty_like(flat)  # [N, D]
    if flat.numel() == 0:
        return out.view(batch, seq, d_model)
    clamps = site.sparse_enc.shape[1]
    with _device_of(x):
        _sparse_delta_kernel[(batch, triton.cdiv(seq, _BLOCK_T))](
            flat, out, rows, _bytes(mask), site.add_vec, site.sparse_enc, site.sparse_dec, site.sparse_params,
            seq,
            d_model=d_model, C=clamps, WITH_ADD=with_add, DOT_F32=not x.is_cuda, PRECISION=_dot_precision(x.dtype),
            BLOCK_T=_BLOCK_T, BLOCK_C=max(16, triton.next_power_of_2(clamps)), BLOCK_D=_block_d(d_model),
        )
    return out.view(batch, seq, d_model)


def full_path(
    x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState, *, in_place: bool = False
) -> torch.Tensor:
    """Full-encode steering of the tokens in ``mask`` whose row is a full row; equal to ``torch_path.full_path``.

    ``x [B, S, D]``, ``rows [B]``, ``mask [B, S]`` bool. For a full-path token, with ``f`` the
    SAE's features (ReLU / JumpReLU / TopK over all ``F``) and ``f'`` after its row's clamps:
    Reconstruct rows give ``f' @ W_dec + b_dec``, other rows ``x + (f' - f) @ W_dec``. Other
    tokens are left exactly as they are. Returns a new tensor, or with ``in_place`` (for an
    ``x`` the caller owns) writes the full-path tokens of ``x`` and returns it.

    Steps, none of which syncs with the host or sizes anything by the data:
    1. one program lists the full-path tokens on the device: Reconstruct first, then the rest;
    then, chunk by chunk of ``torch_path.FULL_PATH_CHUNK`` slots of that list:
    2. encode the chunk's tokens (gathered by index inside the GEMM) into ``f [chunk, F]``;
       TopK keeps the k largest of each, one program per token, and lists them;
    3. decode the Reconstruct rows of ``f``: TopK from its k listed decoder rows, the others
       densely (split over ``F`` when there are few tokens);
    4. per full-path token, add the clamps' ``(f' - f) @ W_dec`` (C decoder rows) and write it.
    Every grid is sized for a whole chunk, and tiles past the device-held counts exit at once,
    so only full-path tokens cost FLOPs. Scratch is O(chunk·F) in the model dtype, plus
    O(chunk·D) fp32, however long the sequence.
    """
    _require_triton()
    batch, seq, d_model = x.shape
    out = x if in_place else x.clone()
    if batch * seq == 0:
        return out
    flat = out.view(batch * seq, d_model)  # [N, D]
    token, bounds = _partition(mask, rows, site)  # [N], [2]
    scratch = _full_scratch(flat, site)
    with _device_of(x):
        # Every chunk is launched (the host does not know the count); empty ones exit at once.
        for chunk_start in range(0, batch * seq, scratch.chunk):
            _encode_chunk(flat, token, bounds, site, scratch, chunk_start)
            _decode_chunk(bounds, site, scratch, chunk_start)
            _write_chunk(flat, rows, token, bounds, site, scratch, chunk_start, seq)
    return out


class _FullScratch(NamedTuple):
    """``full_path``'s launch shape and per-chunk buffers, allocated once and reused by every chunk."""

    chunk: int  # slots per chunk
    block_m: int  # slots per GEMM tile
    splits: int  # parts the dense decode splits F into
    gemm: dict[str, Any]  # the GEMM kernels' shared compile-time options
    f: torch.Tensor  # [chunk, F] model dtype; slots past the count stay unused
    kept: torch.Tensor | None  # [chunk, k] int32, the features TopK keeps; None for elementwise SAEs
    dec: torch.Tensor  # [splits, chunk, D] fp32 partial decodes of the Reconstruct slots


def _full_scratch(flat: torch.Tensor, site: SiteState) -> _FullScratch:
    n, d_model = flat.shape
    d_sae = site.W_enc.shape[1]
    chunk = min(n, torch_path.FULL_PATH_CHUNK)
    block_m = 16 if chunk <= 16 else 64
    topk = site.activation == "topk"
    # A TopK token's decode gathers its K rows in one part; the others split a dense GEMM over F.
    tiles = triton.cdiv(chunk, block_m) * triton.cdiv(d_model, _BLOCK_N)
    splits = 1 if topk else _decode_splits(tiles, d_sae, flat.device)
    new = functools.partial(torch.empty, device=flat.device)
    return _FullScratch(
        chunk=chunk, block_m=block_m, splits=splits,
        gemm=dict(DOT_F32=not flat.is_cuda, PRECISION=_dot_precision(flat.dtype), BLOCK_M=block_m,
                  BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K),
        f=new(chunk, d_sae, dtype=flat.dtype),
        kept=new(chunk, site.k, dtype=torch.int32) if topk else None,
        dec=new(splits, chunk, d_model, dtype=torch.float32),
    )


def _encode_chunk(
    flat: torch.Tensor, token: torch.Tensor, bounds: torch.Tensor, site: SiteState, s: _FullScratch, chunk_start: int
) -> None:
    """Step 2: ``s.f`` = the activations of the chunk's full-path tokens (TopK: the kept k, listed in ``s.kept``)."""
    d_model, d_sae = flat.shape[1], s.f.shape[1]
    _encode_kernel[(triton.cdiv(s.chunk, s.block_m), triton.cdiv(d_sae, _BLOCK_N))](
        flat, token, bounds, site.W_enc, site.b_enc, site.threshold, s.f,
        chunk_start, s.chunk,
        d_model=d_model, d_sae=d_sae, TOPK=s.kept is not None, **s.gemm,
    )
    if s.kept is not None:
        _select_top_k(s.f, s.kept, bounds, chunk_start)


def _decode_chunk(bounds: torch.Tensor, site: SiteState, s: _FullScratch, chunk_start: int) -> None:
    """Step 3: ``s.dec`` = the fp32 decode ``f @ W_dec`` of the chunk's Reconstruct slots, in ``s.splits`` parts."""
    d_model, d_sae = s.dec.shape[2], s.f.shape[1]
    if s.kept is not None:
        _gather_decode_kernel[(s.chunk, triton.cdiv(d_model, _GATHER_BLOCK_D))](
            s.f, s.kept, bounds, site.W_dec, s.dec,
            chunk_start,
            d_model=d_model, d_sae=d_sae, K=s.kept.shape[1], BLOCK_J=_GATHER_BLOCK_J, BLOCK_D=_GATHER_BLOCK_D,
        )
        return
    _decode_kernel[(triton.cdiv(s.chunk, s.block_m), triton.cdiv(d_model, _BLOCK_N), s.splits)](
        s.f, bounds, site.W_dec, s.dec,
        chunk_start, s.chunk,
        d_model=d_model, d_sae=d_sae, K_SPLIT=triton.cdiv(triton.cdiv(d_sae, s.splits), _BLOCK_K) * _BLOCK_K,
        **s.gemm,
    )


def _write_chunk(
    flat: torch.Tensor, rows: torch.Tensor, token: torch.Tensor, bounds: torch.Tensor, site: SiteState,
    s: _FullScratch, chunk_start: int, seq: int,
) -> None:
    """Step 4: apply the clamps and overwrite the chunk's full-path tokens of ``flat`` in place."""
    d_model, d_sae = flat.shape[1], s.f.shape[1]
    clamps = site.clamp_idx.shape[1]
    _full_output_kernel[(s.chunk,)](
        flat, rows, token, bounds, s.f, s.dec, site.W_dec, site.b_dec,
        site.clamp_idx, site.clamp_mul, site.clamp_shift,
        chunk_start, seq, s.chunk,
        d_model=d_model, d_sae=d_sae, C=clamps, SPLITS=s.splits,
        BLOCK_C=triton.next_power_of_2(clamps), BLOCK_D=_block_d(d_model),
    )


def _select_top_k(f: torch.Tensor, kept: torch.Tensor, bounds: torch.Tensor, chunk_start: int) -> None:
    """In ``f [chunk, F]`` (ReLU'd features of slots ``chunk_start...``), keep the ``k`` largest of each
    full-path slot (``chunk_start + m < bounds[1]``) and zero the rest, in place, and write their
    features to ``kept [chunk, k]`` int32 in feature order; ties as ``top_k_indices``."""
    chunk, d_sae = f.shape
    _topk_kernel[(chunk,)](
        f, kept, bounds,
        chunk_start,
        d_sae=d_sae, K=kept.shape[1], LOW_BIT=_LOW_KEY_BIT[f.dtype], BLOCK=min(_TOPK_BLOCK, triton.next_power_of_2(d_sae)),
        num_warps=_TOPK_WARPS,
    )


def top_k_features(f: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[n, k]`` (int64, in feature order) of the ``k`` largest of the non-negative
    ``f [n, F]``, ties as ``top_k_indices``: the TopK path's radix select, for every row.
    ``f`` is scratch: its other entries are zeroed in place."""
    _require_triton()
    kept = torch.empty(f.shape[0], k, dtype=torch.int32, device=f.device)
    every_row = torch.full((2,), f.shape[0], dtype=torch.long, device=f.device)  # bounds[1]: rows selected
    with _device_of(f):
        _select_top_k(f, kept, every_row, 0)
    return kept.long()


def _partition(mask: torch.Tensor, rows: torch.Tensor, site: SiteState) -> tuple[torch.Tensor, torch.Tensor]:
    """Device-side list of the full-path tokens: those in ``mask [B, S]`` whose row is a full row.

    Returns ``token [N]`` int64, the token in each slot: Reconstruct tokens first, then the
    other full-path ones, each group in token order (slots past the count are unwritten), and
    ``bounds [2]`` int64 = ``(n_reconstruct, n_full)``, left on the device for the kernels to read.
    """
    batch, seq = mask.shape
    n = batch * seq
    token = torch.empty(n, dtype=torch.long, device=mask.device)  # [N]
    bounds = torch.empty(2, dtype=torch.long, device=mask.device)  # [2]
    with _device_of(mask):
        _partition_kernel[(1,)](
            _bytes(mask), rows, _bytes(site.full_row), _bytes(site.reconstruct_row), token, bounds,
            n, seq,
            BLOCK=max(_PARTITION_MIN, triton.next_power_of_2(n)),
        )
    return token, bounds


def _block_d(d_model: int) -> int:
    return min(_MAX_BLOCK_D, triton.next_power_of_2(d_model))


def _decode_splits(tiles: int, d_sae: int, device: torch.device) -> int:
    """How many parts the decode splits ``F`` into: enough programs to fill the GPU when the
    tokens alone give too few tiles (decode steps), never parts under two GEMM steps."""
    programs = 2 * _multiprocessors(device)
    return max(1, min(programs // tiles, d_sae // (2 * _BLOCK_K), 32))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small GPU, so that the CPU tests split the decode too
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs use TF32 only where torch's own matmuls are allowed to (fp32 tolerance is 1e-5)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # the default; it only affects fp32 operands


def _bytes(flags: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, the same memory: every Triton version and the interpreter load bytes."""
    return flags.reshape(-1).view(torch.uint8)  # [numel]


def _device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device's current stream: make that ``x``'s device."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _require_triton() -> None:
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "sae_compile: triton_sae's kernels were called directly, but triton is not installed. "
            "The steering op never needs this: without triton it runs the torch path "
            "(sae_compile.lowering.kernels.torch_path) on every device. To use the kernels, install "
            "triton (CUDA builds of torch ship it), or call torch_path.sparse_delta / "
            "torch_path.full_path instead."
        )
