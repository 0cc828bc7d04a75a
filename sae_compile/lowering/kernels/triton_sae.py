"""Triton kernels for one site's SAE steering, equal to the torch path (DESIGN §4) without its costs.

- ``sparse_delta``: the delta path of ReLU/JumpReLU rows, one fused kernel, one program per
  token: encode with the ``C`` clamped features' encoder rows (pre-gathered per steering row),
  apply the clamps, decode the delta with their ``C`` decoder rows. O(C·D) per token, no
  [N, F] buffer. With ``with_add`` it also does the additive step first, as ``steer_site`` does.
- ``full_path``: Reconstruct rows and TopK SAEs. A device-side compaction puts the steered
  tokens first; the encode and decode GEMMs have grids sized for every token, and tiles past
  the device-held count exit at once, so only steered tokens cost FLOPs.

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

import torch

from ...runtime.state import SiteState

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is an optional, GPU-only dependency
    triton = None

TRITON_AVAILABLE: bool = triton is not None

# Tile sizes of the encode/decode GEMMs (tl.dot needs every dimension >= 16).
_BLOCK_N = 64
_BLOCK_K = 32
# Width of the per-token loops over the hidden size.
_BLOCK_D = 128

# The sizes that bound loops (D, F, C) are compile-time constants: they are fixed per site, so
# that costs one compile per site, and the interpreter (Triton 3.6 with NumPy 2) cannot loop to
# a runtime bound. The sequence length varies per call and stays a runtime argument.


if TRITON_AVAILABLE:

    @triton.jit
    def _sparse_delta_kernel(
        x_ptr, out_ptr, rows_ptr, mask_ptr, add_vec_ptr, enc_ptr, dec_ptr, params_ptr,
        seq,
        d_model: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, WITH_ADD: tl.constexpr,
    ):
        """One program per token of ``x [N, D]`` (``N = B * S``, row-major); see ``sparse_delta``."""
        dtype = out_ptr.dtype.element_ty
        token = tl.program_id(0).to(tl.int64)
        row = tl.load(rows_ptr + token // seq)  # the steering row of this token's batch row
        steered = tl.load(mask_ptr + token) != 0
        # How many clamp slots / hidden dims this token reads: 0 when unsteered. (Masks are then
        # plain comparisons: some interpreter versions mis-broadcast a scalar bool in `&`.)
        live_c = tl.where(steered, C, 0)
        live_d = tl.where(steered, d_model, 0)
        offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_on = offs_c < live_c  # [BLOCK_C]
        enc_rows = enc_ptr + row * C * d_model  # sparse_enc[row] [C, D]
        dec_rows = dec_ptr + row * C * d_model  # sparse_dec[row] [C, D]
        x_row = x_ptr + token * d_model
        add_row = add_vec_ptr + row * d_model

        # Pass 1: pre-activations of the C clamped features, from x after the additive step.
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)  # [BLOCK_C]
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < live_d
            xs = tl.load(x_row + offs_d, mask=d_on, other=0.0).to(tl.float32)  # [BLOCK_D]
            if WITH_ADD:
                # The encoder sees x + v rounded to the model dtype, as in the torch path.
                xs = (xs + tl.load(add_row + offs_d, mask=d_on, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
            w = tl.load(enc_rows + offs_c[:, None] * d_model + offs_d[None, :],
                        mask=c_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
            acc += tl.sum(w.to(tl.float32) * xs[None, :], axis=1)
        params = params_ptr + row * 4 * C  # sparse_params[row] [4, C] fp32
        b_enc = tl.load(params + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        theta = tl.load(params + C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        mul_m1 = tl.load(params + 2 * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        shift = tl.load(params + 3 * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        pre = acc.to(dtype).to(tl.float32) + b_enc  # [BLOCK_C]; x @ enc at model precision, as bmm gives it
        f = tl.where(pre > theta, pre, 0.0)  # [BLOCK_C] JumpReLU (theta = 0: ReLU)
        coef = shift + f * mul_m1  # [BLOCK_C] = f' - f; 0 on unused slots and non-sparse rows

        # Pass 2: out = (x [+ v]) + coef @ dec; unsteered tokens are copied bit for bit.
        out_row = out_ptr + token * d_model
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < d_model
            x_raw = tl.load(x_row + offs_d, mask=d_on, other=0.0)  # [BLOCK_D] model dtype
            base = x_raw.to(tl.float32)  # [BLOCK_D]
            if WITH_ADD:
                base = base + tl.load(add_row + offs_d, mask=offs_d < live_d, other=0.0).to(tl.float32)
                base = base.to(dtype).to(tl.float32)
            w = tl.load(dec_rows + offs_c[:, None] * d_model + offs_d[None, :],
                        mask=c_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
            delta = tl.sum(coef[:, None] * w.to(tl.float32), axis=0)  # [BLOCK_D]
            tl.store(out_row + offs_d, tl.where(steered, (base + delta).to(dtype), x_raw), mask=d_on)

    @triton.jit
    def _encode_kernel(
        x_ptr, token_ptr, bounds_ptr, w_enc_ptr, b_enc_ptr, threshold_ptr, f_ptr,
        d_model: tl.constexpr, d_sae: tl.constexpr,
        TOPK: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``f[m] = act(x[token[m]] @ W_enc_t.T + b_enc)`` for slots ``m < bounds[1]`` (the steered ones).

        For TopK the activation here is only the ReLU; the caller keeps the k largest.
        """
        dtype = f_ptr.dtype.element_ty
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        count = tl.load(bounds_ptr + 1)
        if pid_m * BLOCK_M >= count:
            return  # the grid covers all N tokens; tiles past the steered ones do nothing
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M] slots
        m_on = offs_m < count
        token = tl.load(token_ptr + offs_m, mask=m_on, other=0)  # [BLOCK_M] int64
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N] features
        n_on = offs_n < d_sae
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        for k0 in range(0, d_model, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_on = offs_k < d_model
            a = tl.load(x_ptr + token[:, None] * d_model + offs_k[None, :],
                        mask=m_on[:, None] & k_on[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_enc_ptr + offs_n[None, :] * d_model + offs_k[:, None],
                        mask=k_on[:, None] & n_on[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_F32:
                # CPU tensors mean the interpreter, which keeps bf16 as raw bits and cannot multiply them.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        b_enc = tl.load(b_enc_ptr + offs_n, mask=n_on, other=0.0).to(tl.float32)  # [BLOCK_N]
        pre = (acc + b_enc[None, :]).to(dtype).to(tl.float32)  # [BLOCK_M, BLOCK_N] at model precision
        if TOPK:
            f = tl.maximum(pre, 0.0)  # [BLOCK_M, BLOCK_N]
        else:
            theta = tl.load(threshold_ptr + offs_n, mask=n_on, other=0.0).to(tl.float32)  # [BLOCK_N]
            f = tl.where(pre > theta[None, :], pre, 0.0)  # [BLOCK_M, BLOCK_N]
        tl.store(f_ptr + offs_m[:, None] * d_sae + offs_n[None, :], f.to(dtype), mask=m_on[:, None] & n_on[None, :])

    @triton.jit
    def _decode_kernel(
        f_ptr, bounds_ptr, w_dec_ptr, dec_ptr,
        d_model: tl.constexpr, d_sae: tl.constexpr,
        DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """``dec[m] = f[m] @ W_dec`` in fp32, for slots ``m < bounds[0]`` (the Reconstruct tokens)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        count = tl.load(bounds_ptr)
        if pid_m * BLOCK_M >= count:
            return  # delta-only tokens need no dense decode: their f' - f lives on C features
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M] slots
        m_on = offs_m < count
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] hidden dims
        n_on = offs_n < d_model
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [BLOCK_M, BLOCK_N]
        for k0 in range(0, d_sae, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BLOCK_K] features
            k_on = offs_k < d_sae
            a = tl.load(f_ptr + offs_m[:, None] * d_sae + offs_k[None, :],
                        mask=m_on[:, None] & k_on[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_dec_ptr + offs_k[:, None] * d_model + offs_n[None, :],
                        mask=k_on[:, None] & n_on[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            if DOT_F32:  # interpreter only, as in _encode_kernel
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(dec_ptr + offs_m[:, None] * d_model + offs_n[None, :], acc, mask=m_on[:, None] & n_on[None, :])

    @triton.jit
    def _full_output_kernel(
        x_ptr, out_ptr, rows_ptr, slot_ptr, bounds_ptr, f_ptr, dec_ptr, w_dec_ptr, b_dec_ptr,
        clamp_idx_ptr, clamp_mul_ptr, clamp_shift_ptr,
        seq,
        d_model: tl.constexpr, d_sae: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per token: apply the clamps and write the token's output (see ``full_path``)."""
        dtype = out_ptr.dtype.element_ty
        token = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + token)  # this token's place in the compaction
        recon = slot < tl.load(bounds_ptr)  # Reconstruct tokens come first ...
        steered = slot < tl.load(bounds_ptr + 1)  # ... then the delta-only ones
        row = tl.load(rows_ptr + token // seq)
        live_c = tl.where(steered, C, 0)  # as in _sparse_delta_kernel
        live_dec = tl.where(recon, d_model, 0)  # only Reconstruct tokens read the dense decode
        offs_c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
        c_on = offs_c < live_c  # [BLOCK_C]
        feat = tl.load(clamp_idx_ptr + row * C + offs_c, mask=c_on, other=0)  # [BLOCK_C] int64
        f = tl.load(f_ptr + slot * d_sae + feat, mask=c_on, other=0.0).to(tl.float32)  # [BLOCK_C]
        mul = tl.load(clamp_mul_ptr + row * C + offs_c, mask=c_on, other=1.0)  # [BLOCK_C]
        shift = tl.load(clamp_shift_ptr + row * C + offs_c, mask=c_on, other=0.0)  # [BLOCK_C]
        coef = (mul - 1.0) * f + shift  # [BLOCK_C] = f' - f on the clamped features

        x_row = x_ptr + token * d_model
        out_row = out_ptr + token * d_model
        dec_row = dec_ptr + slot * d_model
        for d0 in range(0, d_model, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
            d_on = offs_d < d_model
            x_raw = tl.load(x_row + offs_d, mask=d_on, other=0.0)  # [BLOCK_D] model dtype
            dec = tl.load(dec_row + offs_d, mask=offs_d < live_dec, other=0.0)  # [BLOCK_D] f @ W_dec
            b_dec = tl.load(b_dec_ptr + offs_d, mask=offs_d < live_dec, other=0.0).to(tl.float32)  # [BLOCK_D]
            w = tl.load(w_dec_ptr + feat[:, None] * d_model + offs_d[None, :],
                        mask=c_on[:, None] & d_on[None, :], other=0.0)  # [BLOCK_C, BLOCK_D]
            delta = tl.sum(coef[:, None] * w.to(tl.float32), axis=0)  # [BLOCK_D] (f' - f) @ W_dec
            # Reconstruct: f' @ W_dec + b_dec (error term dropped); delta: x + (f' - f) @ W_dec.
            base = tl.where(recon, dec + b_dec, x_raw.to(tl.float32))  # [BLOCK_D]
            tl.store(out_row + offs_d, tl.where(steered, (base + delta).to(dtype), x_raw), mask=d_on)


def sparse_delta(
    x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState, *, with_add: bool = False
) -> torch.Tensor:
    """Error-preserving clamps of an elementwise (ReLU/JumpReLU) SAE; equal to ``torch_path._sparse_delta``.

    ``x [B, S, D]``, ``rows [B]`` (steering row per batch row), ``mask [B, S]`` bool (the tokens
    to steer; ``torch_path`` passes the same mask as a 0/1 ``weight``). Each steered token of
    row ``r`` becomes ``x + sum_c (shift_c + f_c * (mul_c - 1)) * sparse_dec[r, c]`` with
    ``f_c = JumpReLU(x @ sparse_enc[r, c] + b_enc_c)``, from the row's pre-gathered tables
    (all zero for rows that are not sparse delta rows, so those add exactly nothing).
    Unsteered tokens are copied exactly.

    ``with_add=True`` fuses the additive step that ``steer_site`` runs first: steered tokens
    start from ``x + add_vec[r]`` (rounded to the model dtype), and the SAE encodes that.

    Returns a new tensor like ``x``. No host sync; one program per token.
    """
    _require_triton()
    batch, seq, d_model = x.shape
    flat = x.reshape(batch * seq, d_model).contiguous()  # [N, D]
    out = torch.empty_like(flat)  # [N, D]
    if flat.numel() == 0:
        return out.view(batch, seq, d_model)
    clamps = site.sparse_enc.shape[1]
    with _device_of(x):
        _sparse_delta_kernel[(batch * seq,)](
            flat, out, rows, _bytes(mask), site.add_vec, site.sparse_enc, site.sparse_dec, site.sparse_params,
            seq,
            d_model=d_model, C=clamps, BLOCK_C=triton.next_power_of_2(clamps), BLOCK_D=_BLOCK_D, WITH_ADD=with_add,
        )
    return out.view(batch, seq, d_model)


def full_path(x: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, site: SiteState) -> torch.Tensor:
    """Full-encode steering of the tokens in ``mask``; equal to ``torch_path._full_path``.

    ``x [B, S, D]``, ``rows [B]``, ``mask [B, S]`` bool. For a steered token, with ``f`` the SAE's
    features (ReLU / JumpReLU / TopK over all ``F``) and ``f'`` after its row's clamps:
    Reconstruct rows give ``f' @ W_dec + b_dec``, other rows ``x + (f' - f) @ W_dec``. Other
    tokens are copied exactly.

    Steps, none of which syncs with the host or sizes anything by the data:
    1. partition the N tokens on the device: Reconstruct, then other steered, then the rest;
    2. encode the first ``n_steered`` (gathered by index inside the GEMM) into ``f [N, F]``;
       TopK keeps the k largest of each row with ``torch.topk`` over the static buffer;
    3. decode the first ``n_reconstruct`` rows of ``f`` densely;
    4. per token, add the clamps' ``(f' - f) @ W_dec`` (C decoder rows) and write the output.
    Scratch is O(N·F) in the model dtype, plus O(N·D) fp32.
    """
    _require_triton()
    batch, seq, d_model = x.shape
    n = batch * seq
    flat = x.reshape(n, d_model).contiguous()  # [N, D]
    out = torch.empty_like(flat)  # [N, D]
    if n == 0:
        return out.view(batch, seq, d_model)
    d_sae = site.W_enc_t.shape[0]
    recon = mask & site.reconstruct_row[rows][:, None]  # [B, S]
    slot, bounds = _partition(mask.reshape(n), recon.reshape(n))  # [N], [3]
    token = torch.empty_like(slot).scatter_(0, slot, torch.arange(n, device=x.device))  # [N] token in each slot
    f = torch.empty(n, d_sae, dtype=x.dtype, device=x.device)  # [N, F]; slots >= n_steered stay unused
    dec = torch.empty(n, d_model, dtype=torch.float32, device=x.device)  # [N, D]; slots >= n_reconstruct unused
    block_m = min(64, max(16, triton.next_power_of_2(n)))
    gemm = dict(DOT_F32=not x.is_cuda, PRECISION=_dot_precision(x.dtype),
                BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    clamps = site.clamp_idx.shape[1]
    with _device_of(x):
        _encode_kernel[(triton.cdiv(n, block_m), triton.cdiv(d_sae, _BLOCK_N))](
            flat, token, bounds, site.W_enc_t, site.b_enc, site.threshold, f,
            d_model=d_model, d_sae=d_sae, TOPK=site.activation == "topk", **gemm,
        )
        if site.activation == "topk":
            top = f.topk(site.k, dim=1)  # values, indices: [N, k]
            f.zero_().scatter_(1, top.indices, top.values)  # [N, F]
        _decode_kernel[(triton.cdiv(n, block_m), triton.cdiv(d_model, _BLOCK_N))](
            f, bounds, site.W_dec, dec, d_model=d_model, d_sae=d_sae, **gemm,
        )
        _full_output_kernel[(n,)](
            flat, out, rows, slot, bounds, f, dec, site.W_dec, site.b_dec,
            site.clamp_idx, site.clamp_mul, site.clamp_shift,
            seq,
            d_model=d_model, d_sae=d_sae, C=clamps, BLOCK_C=triton.next_power_of_2(clamps), BLOCK_D=_BLOCK_D,
        )
    return out.view(batch, seq, d_model)


def _partition(steered: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable device-side partition of ``N`` tokens into Reconstruct, other steered, unsteered.

    ``steered [N]``, ``recon [N]`` bool (``recon`` implies ``steered``). Returns each token's slot
    ``[N]`` int64 (a permutation of ``0..N-1``) and the group ends ``[3]`` int64:
    ``(n_reconstruct, n_steered, N)``, left on the device for the kernels to read.
    """
    groups = torch.stack((recon, steered & ~recon, ~steered), dim=1).long()  # [N, 3] one-hot
    ranks = groups.cumsum(0)  # [N, 3] inclusive rank within each group
    ends = ranks[-1].cumsum(0)  # [3]
    starts = ends - ranks[-1]  # [3]
    slot = ((starts + ranks - 1) * groups).sum(1)  # [N]
    return slot, ends


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
            "sae_compile: the Triton kernels were called but triton is not installed. They are only "
            "needed on CUDA; install triton (it ships with CUDA builds of torch) or use torch_path.steer_site."
        )
