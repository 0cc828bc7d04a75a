"""The sparse autoencoder as a value: weights plus the activation that reads them.

Naming follows SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``. The math is DESIGN §4::

    pre   = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc
    f     = act(pre)
    x_hat = f @ W_dec + b_dec

With ``layer_norm_input`` (OpenAI's TopK autoencoders) ``x`` is first layer-normalised,
``x_n, mu, std = LN(x)``, the SAE runs on ``x_n``, and ``x_hat * std + mu`` maps its output back.

The activations live in ``sae_compile.activations``, shared with the torch steering path;
checkpoint files are read and written by ``sae_compile.checkpoints``.
"""

from __future__ import annotations

import os

import torch

from .activations import ACTIVATIONS, Activation, activate_, layer_norm
from .checkpoints import read_checkpoint, save_sae
from .hub import HF_SCHEME, parse_hf_uri, read_hub_checkpoint
from .releases import SAELENS_SCHEME, parse_release_uri, resolve_release


class SAE:
    """A sparse autoencoder with a ReLU, JumpReLU (per-feature threshold) or TopK activation.

    - ReLU: ``f = relu(pre)``.
    - JumpReLU: ``f = relu(pre) * (pre > threshold)``, SAELens's definition; a negative
      threshold therefore acts as 0. ``threshold`` is a ``[d_sae]`` tensor or one float for
      every feature.
    - TopK: the ``k`` largest of ``relu(pre)``, the rest 0; at a tie on the k-th value the
      lower feature indices win.

    ``apply_b_dec_to_input`` defaults to **False** here, unlike SAELens, where it defaults to
    True: code ported from SAELens that relies on its default must pass
    ``apply_b_dec_to_input=True``. ``SAE.load`` reads the setting from the checkpoint.

    ``layer_norm_input=True`` normalises each input first, as OpenAI's TopK autoencoders do
    (``sparse_autoencoder/model.py``; SAELens's ``normalize_activations="layer_norm"``):
    ``x_n = (x - mu) / (std + 1e-5)`` with ``mu`` the mean and ``std`` the unbiased standard
    deviation over ``d_in``, and the SAE math runs on ``x_n``. ``decode(f, x)`` maps the
    reconstruction back with the statistics of the input ``x``: ``x_hat_n * std + mu``. When
    steering, additive edits apply to ``x`` itself, a clamp adds ``std * (f' - f) @ W_dec``, and
    ``Reconstruct`` gives ``(f' @ W_dec + b_dec) * std + mu``.

    Instances are immutable values: every constructor argument is exposed as an attribute
    of the same name, and ``to()`` returns a new SAE. ``hook_name`` is the site the SAE was
    trained on (a TransformerLens hook name); ``sc.steer(model, [sae])`` places it there.
    All tensors take ``W_enc``'s dtype and must be on ``W_enc``'s device.

    Raises ``TypeError`` for arguments of the wrong kind and ``ValueError`` for wrong shapes,
    devices, non-finite values, or settings that do not fit the activation.
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
        layer_norm_input: bool = False,
    ) -> None:
        d_in, d_sae = _check_weights(W_enc, W_dec)
        _check_layer_norm_input(layer_norm_input, d_in)
        b_enc = _vector_or_zeros("b_enc", b_enc, W_enc, d_sae)
        b_dec = _vector_or_zeros("b_dec", b_dec, W_enc, d_in)
        _check_activation(activation)
        threshold = _threshold_for(activation, threshold, W_enc)
        _check_k(activation, k, d_sae)
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}
        _check_device_and_finite({name: t for name, t in tensors.items() if t is not None}, W_enc.device)
        dtype = W_enc.dtype
        self.W_enc = W_enc
        self.W_dec = W_dec.to(dtype)
        self.b_enc = b_enc.to(dtype)
        self.b_dec = b_dec.to(dtype)
        self.threshold = None if threshold is None else threshold.to(dtype)
        self.activation: Activation = activation
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.hook_name = hook_name
        self.layer_norm_input = layer_norm_input

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
        """Feature activations ``f [..., d_sae]`` for inputs ``x [..., d_in]`` (see the class docstring)."""
        x = x.to(self.dtype)
        if self.layer_norm_input:
            x = layer_norm(x)[0]
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae], a fresh tensor the activation may overwrite
        return activate_(pre, self.activation, self.threshold, self.k)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x_hat [..., d_in]`` of feature activations ``f [..., d_sae]``:
        ``f @ W_dec + b_dec``.

        With ``layer_norm_input`` that is the reconstruction of the normalised input, and ``x``, the
        input ``[..., d_in]`` that ``f`` was encoded from, is required: its mean and standard
        deviation map the result back, ``(f @ W_dec + b_dec) * std + mu``, as OpenAI's decode does.
        Without it ``x`` is not needed and not read.
        """
        x_hat = f.to(self.dtype) @ self.W_dec + self.b_dec  # [..., d_in]
        if not self.layer_norm_input:
            return x_hat
        if x is None:
            raise ValueError(
                "SAE.decode: this SAE layer-normalises its input (layer_norm_input=True), so its "
                "reconstruction is in the normalised space and needs the input's mean and standard "
                "deviation to map back. Pass the input the features were encoded from: sae.decode(f, x)."
            )
        _, mu, std = layer_norm(x.to(self.dtype))  # [..., 1] each
        return x_hat * std + mu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``decode(encode(x), x)``."""
        return self.decode(self.encode(x), x)

    __call__ = forward

    def to(self, *args, **kwargs) -> SAE:
        """A copy with every tensor moved by ``Tensor.to(*args, **kwargs)`` (dtype and/or device)."""
        threshold = None if self.threshold is None else self.threshold.to(*args, **kwargs)
        return SAE(
            *(t.to(*args, **kwargs) for t in (self.W_enc, self.W_dec, self.b_enc, self.b_dec)),
            activation=self.activation, threshold=threshold, k=self.k,
            apply_b_dec_to_input=self.apply_b_dec_to_input, hook_name=self.hook_name,
            layer_norm_input=self.layer_norm_input,
        )

    @staticmethod
    def load(
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hook_name: str | None = None,
        layer: int | None = None,
    ) -> SAE:
        """Read an SAE checkpoint (SAELens, Gemma Scope, EleutherAI sparsify, dictionary_learning,
        Goodfire, OpenAI's GPT-2 autoencoders, Llama Scope), detecting its format; the options and errors are
        ``sae_compile.checkpoints.read_checkpoint``'s.

        ``dtype`` / ``device`` convert the tensors (``None``: as stored, on the CPU, as views of the
        memory-mapped file); ``hook_name`` / ``layer`` override where the SAE goes. A path
        ``hf://OWNER/NAME[@REVISION]/PATH/IN/REPO`` is read from the Hugging Face Hub by
        ``SAE.from_pretrained``, and ``saelens://RELEASE/SAE_ID`` (a SAELens release name and SAE
        id, e.g. ``saelens://gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical``) by
        ``SAE.from_release``.
        """
        options = {"dtype": dtype, "device": device, "hook_name": hook_name, "layer": layer}
        if isinstance(path, str) and path.startswith(HF_SCHEME):
            repo_id, path_in_repo, revision = parse_hf_uri(path)
            return SAE.from_pretrained(repo_id, path_in_repo, revision=revision, **options)
        if isinstance(path, str) and path.startswith(SAELENS_SCHEME):
            return SAE.from_release(*parse_release_uri(path), **options)
        return SAE(**read_checkpoint(path, **options)._asdict())

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        path_in_repo: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hook_name: str | None = None,
        layer: int | None = None,
    ) -> SAE:
        """Load the SAE in the folder (or weights file) ``path_in_repo`` of the Hugging Face Hub
        model repository ``repo_id``, e.g. ``("google/gemma-scope-2b-pt-res",
        "layer_20/width_16k/average_l0_71")``; ``None`` is the repository's top folder.

        Only the files of that one SAE are downloaded (chosen from the folder's listing by the same
        rule as ``SAE.load`` uses for a local folder), at ``revision`` (default: main), into
        ``cache_dir`` (default: the Hugging Face cache). ``HF_HUB_OFFLINE=1`` loads from the cache
        without network. The other options are ``SAE.load``'s. Needs ``huggingface_hub``
        (``pip install "sae-compile[hub]"``; ``ImportError`` without it); errors are
        ``sae_compile.hub.read_hub_checkpoint``'s and name the repo, the path and what was missing.
        """
        checkpoint = read_hub_checkpoint(
            repo_id, path_in_repo, revision=revision, cache_dir=cache_dir,
            dtype=dtype, device=device, hook_name=hook_name, layer=layer,
        )
        return cls(**checkpoint._asdict())

    @classmethod
    def from_release(
        cls,
        release: str,
        sae_id: str,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        hook_name: str | None = None,
        layer: int | None = None,
    ) -> SAE:
        """Load SAE ``sae_id`` of the SAELens release ``release``, e.g.
        ``("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")``.

        The name resolves to a Hub repository and path as SAELens resolves it: with SAELens's own
        directory when ``sae_lens`` is installed, else with ``sae_compile.releases.TABLE`` (the major
        releases). The SAE is then loaded by ``SAE.from_pretrained`` with the other options, its
        format detected from the folder's files. An unknown release or id is a ``ValueError``
        naming it, with the closest known names.
        """
        repo_id, path_in_repo = resolve_release(release, sae_id)
        return cls.from_pretrained(
            repo_id, path_in_repo, revision=revision, cache_dir=cache_dir,
            dtype=dtype, device=device, hook_name=hook_name, layer=layer,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write this SAE as a SAELens directory (``cfg.json`` + ``sae_weights.safetensors``)."""
        save_sae(self, path)

    def __repr__(self) -> str:
        extra = f", k={self.k}" if self.k is not None else ""
        extra += ", layer_norm_input=True" if self.layer_norm_input else ""
        return (
            f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{extra}, "
            f"apply_b_dec_to_input={self.apply_b_dec_to_input}, hook_name={self.hook_name!r}, dtype={self.dtype})"
        )


#: ``SAE.load`` as a function.
load_sae = SAE.load


# ------------------------------------------------------------------------------- validation steps


def _check_weights(W_enc: object, W_dec: object) -> tuple[int, int]:
    """``(d_in, d_sae)`` of a floating point ``W_enc [d_in, d_sae]`` and ``W_dec [d_sae, d_in]``."""
    if not isinstance(W_enc, torch.Tensor) or not isinstance(W_dec, torch.Tensor):
        raise TypeError(
            f"SAE: W_enc and W_dec must be torch.Tensor objects, got {type(W_enc).__name__} and "
            f"{type(W_dec).__name__}. Convert them with torch.as_tensor(...)."
        )
    if W_enc.dim() != 2:
        raise ValueError(f"SAE: W_enc must be 2-D [d_in, d_sae], got shape {tuple(W_enc.shape)}.")
    d_in, d_sae = W_enc.shape
    if tuple(W_dec.shape) != (d_sae, d_in):
        raise ValueError(
            f"SAE: W_dec must have shape [d_sae, d_in] = {(d_sae, d_in)} to match W_enc "
            f"{tuple(W_enc.shape)}, got {tuple(W_dec.shape)}. A W_dec stored as [d_in, d_sae] needs .T."
        )
    if not W_enc.is_floating_point() or not W_dec.is_floating_point():
        raise TypeError(f"SAE: weights must be floating point tensors, got {W_enc.dtype} and {W_dec.dtype}.")
    return d_in, d_sae


def _check_layer_norm_input(layer_norm_input: object, d_in: int) -> None:
    if not isinstance(layer_norm_input, bool):
        raise TypeError(f"SAE: layer_norm_input must be True or False, got {layer_norm_input!r}.")
    if layer_norm_input and d_in < 2:
        raise ValueError(
            f"SAE: layer_norm_input=True needs d_in >= 2, got d_in={d_in}: the unbiased standard deviation "
            "of a single value is undefined."
        )


def _vector_or_zeros(name: str, t: object, W_enc: torch.Tensor, length: int) -> torch.Tensor:
    """``t`` checked to be a ``[length]`` tensor, or zeros like ``W_enc`` when it is ``None``."""
    if t is None:
        return W_enc.new_zeros(length)
    _check_vector(name, t, length)
    return t


def _check_activation(activation: object) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"SAE: activation must be one of {ACTIVATIONS}, got {activation!r}.")


def _threshold_for(
    activation: str, threshold: torch.Tensor | float | None, W_enc: torch.Tensor
) -> torch.Tensor | None:
    """The ``[d_sae]`` JumpReLU threshold (a float applies to every feature, on ``W_enc``'s device);
    ``None`` for the other activations."""
    if activation != "jumprelu":
        if threshold is not None:
            raise ValueError(f"SAE: threshold is only meaningful for activation='jumprelu', not {activation!r}.")
        return None
    if threshold is None:
        raise ValueError("SAE: activation='jumprelu' needs a threshold (a [d_sae] tensor or a float).")
    d_sae = W_enc.shape[1]
    if not isinstance(threshold, torch.Tensor):
        threshold = torch.tensor(float(threshold), device=W_enc.device)
    if threshold.dim() == 0:
        threshold = threshold.expand(d_sae).clone()
    _check_vector("threshold", threshold, d_sae)
    return threshold


def _check_k(activation: str, k: object, d_sae: int) -> None:
    if activation != "topk":
        if k is not None:
            raise ValueError(f"SAE: k is only meaningful for activation='topk', not {activation!r}.")
        return
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(f"SAE: activation='topk' needs an integer k in [1, d_sae={d_sae}], got {k!r}.")


def _check_device_and_finite(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"SAE: {name} is on {t.device} but W_enc is on {device}; put them on one device.")
        lo, hi = torch.aminmax(t)  # a reduction: no tensor-sized temporary, and NaN propagates
        if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
            raise ValueError(
                f"SAE: {name} contains NaN or inf values, which would make every steered activation NaN. "
                "Check the weights (or load them in a wider dtype)."
            )


def _check_vector(name: str, t: object, length: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"SAE: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if tuple(t.shape) != (length,):
        raise ValueError(f"SAE: {name} must have shape [{length}], got {tuple(t.shape)}.")
