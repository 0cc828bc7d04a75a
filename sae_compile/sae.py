"""The sparse autoencoder as a value: weights plus the activation that reads them.

Naming follows SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``. The math is DESIGN §4::

    pre   = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    f     = act(pre)
    x_hat = f @ W_dec + b_dec
"""

from __future__ import annotations

import os
from typing import Literal

import torch

Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk")


def top_k_indices(f: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` of the ``k`` largest of the non-negative ``f [..., F]``; at a tie on
    the k-th value, the lower indices win.

    ``torch.topk`` leaves ties to the implementation (its CPU kernels alone differ by size),
    and a TopK SAE in bf16 ties often. The rule is fixed so that every path, on every
    device, fires the same features: each value is ranked by a 64-bit key, its float bits
    (which order non-negative floats as the floats) above its reversed index.
    """
    features = f.shape[-1]
    if not f.is_cuda and k < features:
        # torch.topk picks the rule's features unless a tie straddles the k-th place; on the
        # CPU checking that costs no sync, and skips the keys, which are 4x slower to rank.
        top = f.topk(k + 1, dim=-1)
        if not bool((top.values[..., k - 1] == top.values[..., k]).any()):
            return top.indices[..., :k]
    bits = f.float().view(torch.int32) & 0x7FFFFFFF  # -0.0 ranks as 0.0
    reversed_index = torch.arange(features - 1, -1, -1, device=f.device)  # [F]
    keys = (bits.to(torch.int64) << 32) | reversed_index  # [..., F]
    return keys.topk(k, dim=-1, sorted=False).indices


def keep_top_k_(f: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the ``k`` largest of the non-negative ``f [..., F]`` (ties as ``top_k_indices``), in place."""
    top = top_k_indices(f, k)  # [..., k]
    values = f.gather(-1, top)  # [..., k]
    return f.zero_().scatter_(-1, top, values)


def jumprelu_(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``pre_i if pre_i > threshold_i else 0``, in place. A product with a 0/1 mask, as SAELens
    computes it: on the CPU, ops that read or write bool tensors (``where``, ``masked_fill_``)
    cost about as much as the encode matmul itself."""
    return pre.mul_(torch.gt(pre, threshold, out=torch.empty_like(pre)))


class SAE:
    """A sparse autoencoder with a ReLU, JumpReLU (per-feature threshold) or TopK activation.

    Instances are immutable values: every constructor argument is exposed as an attribute
    of the same name, and ``to()`` returns a new SAE. ``hook_name`` is the site the SAE was
    trained on (a TransformerLens hook name); ``sc.steer(model, [sae])`` places it there.
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_enc: torch.Tensor | None = None,
        b_dec: torch.Tensor | None = None,
        *,
        activation: Activation = "relu",
        threshold: torch.Tensor | float | None = None,
        k: int | None = None,
        apply_b_dec_to_input: bool = False,
        hook_name: str | None = None,
    ) -> None:
        if not isinstance(W_enc, torch.Tensor) or not isinstance(W_dec, torch.Tensor):
            raise TypeError("SAE: W_enc and W_dec must be torch.Tensor objects.")
        if W_enc.dim() != 2:
            raise ValueError(f"SAE: W_enc must be 2-D [d_in, d_sae], got shape {tuple(W_enc.shape)}.")
        d_in, d_sae = W_enc.shape
        if tuple(W_dec.shape) != (d_sae, d_in):
            raise ValueError(
                f"SAE: W_dec must have shape [d_sae, d_in] = {(d_sae, d_in)} to match W_enc "
                f"{tuple(W_enc.shape)}, got {tuple(W_dec.shape)}."
            )
        if not W_enc.is_floating_point() or not W_dec.is_floating_point():
            raise TypeError("SAE: weights must be floating point tensors.")
        b_enc = W_enc.new_zeros(d_sae) if b_enc is None else b_enc
        b_dec = W_enc.new_zeros(d_in) if b_dec is None else b_dec
        _check_vector("b_enc", b_enc, d_sae)
        _check_vector("b_dec", b_dec, d_in)
        if activation not in ACTIVATIONS:
            raise ValueError(f"SAE: activation must be one of {ACTIVATIONS}, got {activation!r}.")
        if activation == "jumprelu":
            if threshold is None:
                raise ValueError("SAE: activation='jumprelu' needs a threshold (a [d_sae] tensor or a float).")
            if not isinstance(threshold, torch.Tensor):
                threshold = torch.tensor(float(threshold))
            if threshold.dim() == 0:
                threshold = threshold.expand(d_sae).clone()
            _check_vector("threshold", threshold, d_sae)
        elif threshold is not None:
            raise ValueError(f"SAE: threshold is only meaningful for activation='jumprelu', not {activation!r}.")
        if activation == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
                raise ValueError(f"SAE: activation='topk' needs an integer k in [1, d_sae={d_sae}], got {k!r}.")
        elif k is not None:
            raise ValueError(f"SAE: k is only meaningful for activation='topk', not {activation!r}.")
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        if threshold is not None:
            tensors["threshold"] = threshold
        for name, t in tensors.items():
            if t.device != W_enc.device:
                raise ValueError(f"SAE: {name} is on {t.device} but W_enc is on {W_enc.device}; put them on one device.")
            lo, hi = torch.aminmax(t)  # a reduction: no tensor-sized temporary, and NaN propagates
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                raise ValueError(f"SAE: {name} contains NaN or inf values.")
        dtype = W_enc.dtype
        self.W_enc = W_enc.to(dtype)
        self.W_dec = W_dec.to(dtype)
        self.b_enc = b_enc.to(dtype)
        self.b_dec = b_dec.to(dtype)
        self.threshold = None if threshold is None else threshold.to(dtype)
        self.activation: Activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.hook_name = hook_name

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``f [..., d_sae]`` for inputs ``x [..., d_in]``."""
        x = x.to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae]
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return jumprelu_(pre, self.threshold)
        return keep_top_k_(pre.relu_(), self.k)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``x_hat [..., d_in]`` of feature activations ``f [..., d_sae]``."""
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    __call__ = forward

    def to(self, *args, **kwargs) -> SAE:
        """A copy with every tensor moved by ``Tensor.to(*args, **kwargs)`` (dtype and/or device)."""
        moved = {name: t.to(*args, **kwargs) for name, t in self._tensors().items()}
        return SAE(
            moved["W_enc"], moved["W_dec"], moved["b_enc"], moved["b_dec"],
            activation=self.activation, threshold=moved.get("threshold"), k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input, hook_name=self.hook_name,
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec, "b_enc": self.b_enc, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        return tensors

    @staticmethod
    def load(
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hook_name: str | None = None,
        layer: int | None = None,
    ) -> SAE:
        """Read an SAE checkpoint, detecting its format (SAELens, Gemma Scope, EleutherAI
        sparsify, dictionary_learning). ``hook_name`` / ``layer`` override where it goes."""
        from .checkpoints import load_sae

        return load_sae(path, dtype=dtype, device=device, hook_name=hook_name, layer=layer)

    def save(self, path: str | os.PathLike) -> None:
        """Write this SAE as a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``)."""
        from .checkpoints import save_sae

        save_sae(self, path)

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        return (
            f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}, "
            f"apply_b_dec_to_input={self.apply_b_dec_to_input}, hook_name={self.hook_name!r}, dtype={self.dtype})"
        )


def _check_vector(name: str, t: object, length: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"SAE: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if tuple(t.shape) != (length,):
        raise ValueError(f"SAE: {name} must have shape [{length}], got {tuple(t.shape)}.")

