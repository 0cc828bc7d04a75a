"""Read SAE checkpoints from the public releases and write them in the SAELens layout (DESIGN §6).

``read_checkpoint(path)`` (behind ``sc.SAE.load`` and ``sae_compile.sae.load_sae``) recognises seven
layouts without importing the library that wrote them:

==========================  ===========================================================
format                      files
==========================  ===========================================================
``saelens``                 ``cfg.json`` + ``sae_weights.safetensors``
``gemma_scope``             ``params.npz`` or ``params.safetensors`` (or any ``.npz`` /
                            ``.safetensors`` holding ``W_enc W_dec b_enc b_dec threshold``)
``sparsify``                ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint
``dictionary_learning``     ``ae.pt`` + ``config.json``
``goodfire``                one ``.pth`` (or ``.pt``) state dict with ``encoder_linear.*``
                            and ``decoder_linear.*`` (Goodfire's Llama 3 SAEs)
``openai``                  one ``{layer}.pt`` state dict with ``encoder.weight``,
                            ``decoder.weight``, ``pre_bias``, ``latent_bias`` (OpenAI's GPT-2
                            small autoencoders)
``llama_scope``             ``hyperparams.json`` + ``checkpoints/final.safetensors`` (Llama Scope)
==========================  ===========================================================

A folder is recognised by its file names (``checkpoint_files``, which ``sae_compile.hub`` also
applies to a Hub folder's listing, so that only those files are downloaded); a ``.pth`` / ``.pt``
file other than ``ae.pt`` by the keys it holds.

Each loader reproduces the encode/decode of the library that wrote the file, as DESIGN §4 math
(``pre = (x - b_dec?) @ W_enc + b_enc``, ``f = act(pre)``, ``x_hat = f @ W_dec + b_dec``), plus the
per-token layer normalisation of OpenAI's TopK autoencoders (``Checkpoint.layer_norm_input``).
Constant scalings (Llama Scope's dataset-wise activation norms and decoder norms) are folded into
the weights, which is exact. What a format can express beyond that (other normalisations, gating,
transcoders, skip connections) is rejected with a ``ValueError`` rather than approximated. Every malformed-file error names the file and
the key. JumpReLU thresholds are kept as stored, negative ones included: every source library's
JumpReLU is ``relu(pre) * (pre > θ)`` (dictionary_learning's BatchTopK and JumpReLU classes write
it differently but agree for every θ), and so is ``sc.SAE``'s.

Nothing here builds an ``sc.SAE``: ``read_checkpoint`` returns a ``Checkpoint`` (the SAE
constructor's arguments) and ``sae_compile.sae`` builds the SAE from it, so this module does not
import ``sae_compile.sae``.

Memory: safetensors files are memory-mapped and each tensor is used in place (a transpose is a
view), so loading adds no second host copy of the weights; ``ae.pt`` is memory-mapped too when it
uses torch's zip format. ``.npz`` cannot be mapped, so it is read once into memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
DICTIONARY_LEARNING_CFG = "config.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
GEMMA_SCOPE_WEIGHTS = ("params.npz", "params.safetensors")
LLAMA_SCOPE_CFG = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"  # relative to the folder of hyperparams.json
TORCH_SUFFIXES = (".pth", ".pt")
# The config file each weights file's loader reads from the checkpoint folder (both relative to it).
_CONFIG_OF_WEIGHTS = {
    SAELENS_WEIGHTS: SAELENS_CFG, SPARSIFY_WEIGHTS: SPARSIFY_CFG, DICTIONARY_LEARNING_WEIGHTS: DICTIONARY_LEARNING_CFG,
    LLAMA_SCOPE_WEIGHTS: LLAMA_SCOPE_CFG,
}
#: The layouts read_checkpoint reads, for error messages.
LAYOUTS = (
    f"SAELens ({SAELENS_CFG} + {SAELENS_WEIGHTS}), Gemma Scope ({' or '.join(GEMMA_SCOPE_WEIGHTS)}), "
    f"sparsify ({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}), dictionary_learning ({DICTIONARY_LEARNING_WEIGHTS} + "
    f"{DICTIONARY_LEARNING_CFG}), Goodfire (one .pth state dict), OpenAI's GPT-2 autoencoders (one "
    f"{{layer}}.pt state dict) and Llama Scope ({LLAMA_SCOPE_CFG} + {LLAMA_SCOPE_WEIGHTS})"
)

_SAELENS_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


# ----------------------------------------------------------------------------------------- public


class Checkpoint(NamedTuple):
    """What a checkpoint holds, in DESIGN §4 terms: the ``sc.SAE`` constructor's arguments by name,
    so ``SAE(**checkpoint._asdict())`` builds it."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    activation: str  # "relu" | "jumprelu" | "topk"
    threshold: torch.Tensor | None  # [d_sae], jumprelu only
    k: int | None  # topk only
    apply_b_dec_to_input: bool
    hook_name: str | None
    layer_norm_input: bool = False  # OpenAI's TopK autoencoders: LN(x) in, x_hat * std + mu out


@runtime_checkable
class SAEFields(Protocol):
    """Anything with the SAE's constructor arguments as attributes: an ``sc.SAE`` or a ``Checkpoint``."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    activation: str
    threshold: torch.Tensor | None
    k: int | None
    apply_b_dec_to_input: bool
    hook_name: str | None
    layer_norm_input: bool


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    hook_name: str | None = None,
    layer: int | None = None,
) -> Checkpoint:
    """Read an SAE checkpoint, detecting its format from the files (see the module docstring).

    ``sae_compile.sae.load_sae`` and ``SAE.load`` build the SAE from what this returns.
    ``path`` is the checkpoint folder or its weights file. ``dtype=None`` keeps the dtype stored
    in the file; ``device=None`` keeps the tensors on the CPU. With neither, the tensors are
    views of the memory-mapped file.

    ``hook_name`` is the TransformerLens hook the SAE was trained on (``blocks.{L}.hook_resid_post``
    etc.), read from the checkpoint: SAELens ``cfg.json`` (``metadata.hook_name``, else
    ``hook_name``); Gemma Scope's path (``layer_{L}``; the release name or folder picks resid_post,
    mlp_out or ``attn.hook_z``; resid_post if neither says); sparsify's hookpoint folder
    (``layers.{L}`` → resid_post, ``layers.{L}.mlp`` → mlp_out, ``layers.{L}.self_attn`` →
    attn_out); dictionary_learning's ``trainer.layer`` and ``submodule_name``; Goodfire's file name
    (``...-SAE-l{L}.pth`` → resid_post); OpenAI's release path (``{location}_{version}/autoencoders/{L}.pt``,
    e.g. ``resid_post_mlp`` → resid_post, ``resid_delta_attn`` → attn_out); Llama Scope's
    ``hook_point_in``. It is ``None``
    where the checkpoint does not say. Pass ``hook_name=`` to replace it, or ``layer=`` to keep
    its hook point and change only the layer.

    Raises ``ValueError`` naming the file (and key) for an unknown layout, a missing key, a shape
    mismatch, non-finite weights, or an architecture/normalisation this library cannot run exactly,
    and ``TypeError`` for options of the wrong kind.
    """
    check_read_options(dtype, hook_name, layer)
    fmt, weights_file = detect_format(path)
    reading = _Reading(dtype=dtype, device=None if device is None else torch.device(device))
    checkpoint = _LOADERS[fmt](weights_file, layer, reading)
    return checkpoint if hook_name is None else checkpoint._replace(hook_name=hook_name)


def save_sae(sae: SAEFields, path: str | os.PathLike[str]) -> None:
    """Write ``sae`` (an ``sc.SAE`` or a ``Checkpoint``) to the folder ``path`` in the SAELens
    layout: ``cfg.json`` + ``sae_weights.safetensors``.

    ``read_checkpoint`` reads it back exactly (same tensors, dtype, activation, k, threshold,
    ``apply_b_dec_to_input``, ``hook_name`` and ``layer_norm_input``), and SAELens reads it with the
    same encode/decode (``layer_norm_input`` is SAELens's ``normalize_activations="layer_norm"``, the
    same equations).
    Both files are replaced atomically, so saving over the checkpoint an SAE was loaded from is
    safe (that SAE's tensors may be views of the old file's mapping).
    """
    if not isinstance(sae, SAEFields):
        raise TypeError(
            f"save_sae: expected an sae_compile SAE (or a Checkpoint), got {type(sae).__name__}. "
            "It needs the SAE's weights and settings; build one with sc.SAE(...) first."
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_enc": sae.b_enc, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    _atomic_write(folder / SAELENS_WEIGHTS, lambda tmp: save_file(_distinct_contiguous(tensors), tmp))
    cfg = _saelens_cfg_of(sae)
    _atomic_write(folder / SAELENS_CFG, lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2)))


def checkpoint_files(names: Collection[str]) -> list[str] | None:
    """The files ``read_checkpoint`` reads from a checkpoint folder that holds the files ``names``:
    the weights file, then the config file its format needs (``files_for_weights``).

    The weights file is the first of ``sae_weights.safetensors``, ``sae.safetensors``, ``ae.pt``,
    ``params.npz``, ``params.safetensors`` present; else ``checkpoints/final.safetensors`` when the
    folder holds ``hyperparams.json`` (Llama Scope keeps its weights in that subfolder, which a
    listing of the folder's files does not show); else the folder's only ``.pth`` / ``.pt`` file.
    ``None`` when there is none of these. ``detect_format`` picks a folder's weights file by this,
    and so does Hub loading from a folder's listing.
    """
    known = (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, DICTIONARY_LEARNING_WEIGHTS, *GEMMA_SCOPE_WEIGHTS)
    weights = next((name for name in known if name in names), None)
    if weights is None and LLAMA_SCOPE_CFG in names:
        weights = LLAMA_SCOPE_WEIGHTS
    torch_files = [name for name in names if Path(name).suffix in TORCH_SUFFIXES]
    if weights is None and len(torch_files) == 1:
        weights = torch_files[0]
    return None if weights is None else files_for_weights(weights)


def files_for_weights(weights_name: str) -> list[str]:
    """``[weights_name]``, followed by the config file that the loader for a weights file of that
    name reads from the checkpoint folder (``cfg.json``, ``config.json`` or ``hyperparams.json``)
    where it reads one. Both names are relative to the checkpoint folder."""
    config = _CONFIG_OF_WEIGHTS.get(weights_name)
    return [weights_name] if config is None else [weights_name, config]


def detect_format(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """The checkpoint format at ``path`` (``saelens``, ``gemma_scope``, ``sparsify``,
    ``dictionary_learning``, ``goodfire``, ``openai`` or ``llama_scope``) and the weights file to read.

    ``path`` may be a checkpoint folder (its weights file is chosen by ``checkpoint_files``) or a
    weights file. Raises ``ValueError`` naming the path when no known layout matches.
    """
    path = Path(path)
    if path.is_dir():
        files = checkpoint_files({p.name for p in path.iterdir() if p.is_file()})
        if files is None:
            raise _unknown_layout(path, _listing(path))
        return detect_format(path / files[0])
    if not path.is_file():
        raise ValueError(
            f"{path}: no such file or folder. load_sae needs a checkpoint folder or its weights "
            "file. Check the path."
        )
    by_name = {
        SAELENS_WEIGHTS: "saelens", SPARSIFY_WEIGHTS: "sparsify", DICTIONARY_LEARNING_WEIGHTS: "dictionary_learning",
    }
    if path.name in by_name:
        return by_name[path.name], path
    if _is_llama_scope_weights(path):
        return "llama_scope", path
    if path.suffix == ".npz" or path.name in GEMMA_SCOPE_WEIGHTS:
        return "gemma_scope", path
    if path.suffix in TORCH_SUFFIXES:
        return _torch_file_format(path), path
    if path.suffix == ".safetensors":
        with _open_weights(path, _Reading(None, None)) as weights:
            if _first_present(weights, "W_enc", "w_enc") and "threshold" in weights:
                return "gemma_scope", path
            raise _unknown_layout(path, sorted(weights.keys))
    raise _unknown_layout(path, [path.name])


def _is_llama_scope_weights(path: Path) -> bool:
    """``.../checkpoints/final.safetensors`` beside a ``hyperparams.json`` one folder up."""
    return path.parent.name == "checkpoints" and path.name == Path(LLAMA_SCOPE_WEIGHTS).name and (
        path.parent.parent / LLAMA_SCOPE_CFG
    ).is_file()


def _torch_file_format(path: Path) -> str:
    """The format of a torch state dict other than ``ae.pt``, by its keys (its name says nothing)."""
    state = _torch_load(path)
    if not isinstance(state, Mapping):
        raise _not_a_state_dict(path, state)
    if "encoder_linear.weight" in state:
        return "goodfire"
    if any(key in state for key in _OPENAI_MARKERS):
        return "openai"
    raise _unknown_layout(path, sorted(map(str, state)))


def check_read_options(dtype: torch.dtype | None, hook_name: str | None, layer: int | None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"load_sae: dtype must be a floating point torch.dtype or None, got {dtype!r}.")
    if hook_name is not None and not isinstance(hook_name, str):
        raise TypeError(f"load_sae: hook_name must be a str or None, got {type(hook_name).__name__}.")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise TypeError(f"load_sae: layer must be an int or None, got {type(layer).__name__}.")
    if layer is not None and layer < 0:
        raise ValueError(f"load_sae: layer must be >= 0, got {layer}. Layers count from 0, as in blocks.0.")
    if hook_name is not None and layer is not None:
        raise ValueError(
            f"load_sae: got both hook_name={hook_name!r} and layer={layer}. hook_name already names "
            "the layer, so the two could disagree. Pass only one of them."
        )


# ------------------------------------------------------------------------------------ file reading


class _Reading(NamedTuple):
    """Where and as what the caller wants the tensors (``None``: as stored, on the CPU)."""

    dtype: torch.dtype | None
    device: torch.device | None


class _Weights:
    """The tensors of one weights file, read one key at a time with errors that name file and key."""

    def __init__(
        self,
        path: Path,
        keys: Collection[str],
        read: Callable[[str], torch.Tensor],
        read_errors: tuple[type[BaseException], ...],
        reading: _Reading,
    ) -> None:
        self.path = path
        self.keys = keys
        self._read = read
        self._read_errors = read_errors
        self._reading = reading

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def raw(self, key: str) -> torch.Tensor:
        """The tensor stored under ``key``, as stored (no dtype/device change, no checks)."""
        if key not in self.keys:
            raise ValueError(
                f"{self.path}: missing tensor {key!r} (the file has {sorted(self.keys)}). The SAE "
                f"cannot be built without it. Check that this is a complete checkpoint of the "
                f"format its files suggest, or re-export it."
            )
        try:
            return self._read(key)
        except self._read_errors as e:
            raise _corrupt(self.path, e, key) from e

    def tensor(self, key: str, shape: tuple[int, ...], meaning: str) -> torch.Tensor:
        """The floating point tensor ``key``, checked to have ``shape`` (``meaning`` names its axes)
        and finite values, converted to the requested dtype/device."""
        t = self.raw(key)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor {key!r} has shape {tuple(t.shape)}, expected {shape} "
                f"({meaning}). The SAE math needs these shapes to agree. Check that the config "
                f"matches these weights, or re-export the checkpoint."
            )
        if not t.is_floating_point():
            raise ValueError(
                f"{self.path}: tensor {key!r} has dtype {t.dtype}, expected a floating point dtype. "
                "SAE weights are real-valued. Re-export the checkpoint with float weights."
            )
        t = t.to(device=self._reading.device, dtype=self._reading.dtype)
        if not _all_finite(t):
            raise ValueError(
                f"{self.path}: tensor {key!r} contains NaN or inf values"
                f"{'' if self._reading.dtype is None else f' (after conversion to {self._reading.dtype})'}. "
                "Non-finite weights would turn every steered activation into NaN. Re-export the "
                "checkpoint from a healthy training step, or load it in a wider dtype."
            )
        return t


@contextlib.contextmanager
def _open_weights(path: Path, reading: _Reading) -> Iterator[_Weights]:
    """Open a ``.safetensors``, ``.npz`` or torch ``.pt`` weights file for keyed reads."""
    if path.suffix == ".safetensors":
        # safe_open maps the file; get_tensor returns a view of the mapping, not a copy.
        with _reraise_corrupt(path, (SafetensorError, OSError)):
            handle = safe_open(str(path), framework="pt", device="cpu")
        with handle:
            yield _Weights(path, set(handle.keys()), handle.get_tensor, (SafetensorError, OSError), reading)
    elif path.suffix == ".npz":
        npz_errors = (ValueError, OSError, EOFError, zipfile.BadZipFile)
        with _reraise_corrupt(path, npz_errors):
            archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise _corrupt(path, TypeError(f"np.load returned {type(archive).__name__}, not an .npz archive"))
        with archive:
            yield _Weights(path, set(archive.files), lambda key: torch.from_numpy(archive[key]), npz_errors, reading)
    else:
        state = _torch_state_dict(path)
        yield _Weights(path, set(state), state.__getitem__, (), reading)


def _torch_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A torch-saved state dict of tensors only, read without running pickled code."""
    state = _torch_load(path)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise _not_a_state_dict(path, state)
    return state


def _torch_load(path: Path) -> object:
    """What a torch-saved file holds, read with ``weights_only=True``: tensors and plain containers,
    strings and numbers only, so no pickled code runs."""
    try:
        # mmap needs torch's zip container; legacy (pre-1.6) files are read into memory instead.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(
            f"{path}: cannot be read as a state dict of tensors ({type(e).__name__}: {e}). Either the file "
            "is corrupt or truncated, or it pickles objects other than tensors, which are never unpickled "
            "here because unpickling them runs code from the file. Re-download it, or re-save it with "
            "torch.save(ae.state_dict(), path)."
        ) from e
    return state


def _not_a_state_dict(path: Path, state: object) -> ValueError:
    return ValueError(
        f"{path}: expected a state dict (str -> Tensor), got {type(state).__name__}. "
        "dictionary_learning (ae.pt), Goodfire (.pth) and OpenAI ({layer}.pt) save the autoencoder's "
        "state_dict(). Re-save it with torch.save(ae.state_dict(), path)."
    )


@contextlib.contextmanager
def _reraise_corrupt(path: Path, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    try:
        yield
    except errors as e:
        raise _corrupt(path, e) from e


def _corrupt(path: Path, error: BaseException, key: str | None = None) -> ValueError:
    where = f"{path}" if key is None else f"{path}: tensor {key!r}"
    return ValueError(
        f"{where}: cannot be read ({type(error).__name__}: {error}). The file is corrupt, truncated "
        "or not in the format its name suggests. Re-download or re-export the checkpoint."
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"{path}: missing config file. The weights alone do not say the SAE's architecture "
            f"or site. Put the checkpoint's {path.name} next to its weights."
        )
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: not valid JSON ({e}). The config is needed to build the SAE. "
            "Re-download or re-export the checkpoint."
        ) from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}. Re-export the checkpoint.")
    return cfg


def _cfg_int(cfg: Mapping[str, Any], key: str, file: Path) -> int:
    """A required positive integer config entry."""
    if key not in cfg:
        raise ValueError(
            f"{file}: missing config key {key!r}. It gives the SAE's shape. Add it, or re-export the checkpoint."
        )
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{file}: config key {key!r} must be a positive integer, got {value!r}. Fix the config.")
    return value


def _cfg_value(cfg: Mapping[str, Any], key: str, file: Path, why: str, kind: type | tuple[type, ...]) -> Any:
    """A required config entry of type ``kind`` (a bool is never a number here)."""
    if key not in cfg:
        raise ValueError(f"{file}: missing config key {key!r}. {why} Add it, or re-export the checkpoint.")
    value = cfg[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise ValueError(f"{file}: config key {key!r} has the wrong type: {value!r}. {why} Fix the config.")
    return value


def _cfg_bool(cfg: Mapping[str, Any], key: str, default: bool, file: Path) -> bool:
    """An optional boolean config entry (``default`` when absent)."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{file}: config key {key!r} must be true or false, got {value!r}. Fix the config.")
    return value


def _topk_k(value: Any, d_sae: int, file: Path, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= d_sae:
        raise ValueError(
            f"{file}: {key!r} must be an integer in [1, d_sae={d_sae}] for a TopK SAE, got {value!r}. "
            "TopK keeps the k largest features, so k must be a valid feature count. Fix the config."
        )
    return value


def _reject(file: Path, key: str, value: Any, why: str, supported: str) -> ValueError:
    return ValueError(
        f"{file}: unsupported {key!r} = {value!r}. {why} Supported: {supported}; convert the "
        "checkpoint to one of these (for example by folding it in the source library) and save it again."
    )


def _all_finite(t: torch.Tensor) -> bool:
    # aminmax is a reduction: no temporary the size of t (torch.isfinite would allocate one),
    # and NaN propagates into both results.
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _first_present(weights: _Weights, *keys: str) -> str | None:
    return next((key for key in keys if key in weights), None)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())


def _unknown_layout(path: Path, contents: list[str]) -> ValueError:
    nested = [c for c in contents if c.endswith("/") and (path / c / "cfg.json").is_file()]
    hint = f" It holds several checkpoints ({nested[:5]}); pass one of those folders." if nested else ""
    return ValueError(
        f"{path}: unknown SAE checkpoint layout (found {contents[:20]}). load_sae reads {LAYOUTS}."
        f"{hint} Point it at a folder or file with one of these layouts, or build the SAE from "
        "tensors with sc.SAE(...)."
    )


# -------------------------------------------------------------------------------------- loaders


def _block_hook(layer: int | None, point: str | None) -> str | None:
    return None if layer is None or point is None else f"blocks.{layer}.{point}"


def _relayer(hook_name: str | None, layer: int | None, file: Path) -> str | None:
    """``hook_name`` moved to ``layer`` (``blocks.{L}.x`` → ``blocks.{layer}.x``); unchanged if layer is None."""
    if layer is None:
        return hook_name
    match = _BLOCK_HOOK.fullmatch(hook_name or "")
    if match is None:
        raise ValueError(
            f"{file}: cannot apply layer={layer}: the checkpoint's hook name {hook_name!r} has no "
            "'blocks.<L>.' part to change. layer= only moves an SAE to another layer of the same "
            "hook point. Pass hook_name= with the full site name instead."
        )
    return f"blocks.{layer}.{match.group(2)}"


def _load_saelens(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    cfg_file = weights_file.parent / SAELENS_CFG
    cfg = _read_json(cfg_file)
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    architecture = _saelens_architecture(cfg, cfg_file)
    _reject_saelens_extras(cfg, metadata, cfg_file)
    d_in, d_sae = _cfg_int(cfg, "d_in", cfg_file), _cfg_int(cfg, "d_sae", cfg_file)
    k = _saelens_k(cfg, d_sae, cfg_file) if architecture == "topk" else None
    hook = metadata.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    with _open_weights(weights_file, reading) as weights:
        _reject_saelens_scaling(weights)
        return Checkpoint(
            W_enc=weights.tensor("W_enc", (d_in, d_sae), "[d_in, d_sae] from cfg.json"),
            W_dec=weights.tensor("W_dec", (d_sae, d_in), "[d_sae, d_in] from cfg.json"),
            b_enc=weights.tensor("b_enc", (d_sae,), "[d_sae]"),
            b_dec=weights.tensor("b_dec", (d_in,), "[d_in]"),
            activation=_SAELENS_ARCHITECTURES[architecture],
            threshold=_saelens_threshold(weights, d_sae) if architecture == "jumprelu" else None,
            k=k,
            # SAELens's own default when the key is absent (pre-6.0 configs) is True.
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            hook_name=_relayer(hook, layer, cfg_file),
            layer_norm_input=_saelens_layer_norm(cfg, cfg_file),
        )


def _saelens_architecture(cfg: Mapping[str, Any], cfg_file: Path) -> str:
    """The SAELens architecture, including pre-6.0 configs that only name an ``activation_fn``."""
    activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if "architecture" not in cfg:
        # Pre-6.0 SAELens: no architecture key; a topk activation_fn means a TopK SAE.
        architecture = "topk" if activation_fn == "topk" else "standard"
    else:
        architecture = cfg["architecture"]
    if architecture not in _SAELENS_ARCHITECTURES:
        raise _reject(
            cfg_file, "architecture", architecture,
            "Only these architectures have the encode/decode of DESIGN §4.", f"{sorted(_SAELENS_ARCHITECTURES)}",
        )
    if architecture == "standard" and activation_fn not in ("relu", None):
        raise _reject(cfg_file, "activation_fn", activation_fn, "A standard SAE here is a ReLU SAE.", "'relu'")
    return architecture


def _reject_saelens_extras(cfg: Mapping[str, Any], metadata: Mapping[str, Any], cfg_file: Path) -> None:
    """Refuse the SAELens options whose math is not DESIGN §4's (rather than approximate them)."""
    _saelens_layer_norm(cfg, cfg_file)
    head = metadata.get("hook_head_index", cfg.get("hook_head_index"))
    if head is not None:
        raise _reject(
            cfg_file, "hook_head_index", head, "The SAE reads a single attention head, which is not a site.", "null"
        )
    if cfg.get("rescale_acts_by_decoder_norm", False):
        raise _reject(
            cfg_file, "rescale_acts_by_decoder_norm", True,
            "Feature activations are scaled by decoder norms, which the SAE math does not do.",
            "false (SAELens: sae.fold_W_dec_norm() then sae.save_model())",
        )


def _saelens_layer_norm(cfg: Mapping[str, Any], cfg_file: Path) -> bool:
    """Whether the SAE layer-normalises its input (``normalize_activations="layer_norm"``, the
    equations of ``layer_norm_input``); any other normalisation is refused."""
    normalize = cfg.get("normalize_activations", "none")
    if normalize not in ("none", None, False, "layer_norm"):
        raise _reject(
            cfg_file, "normalize_activations", normalize,
            "The SAE expects its input rescaled by statistics that are not part of the SAE math "
            "(DESIGN §4), so steering with it as-is would be wrong.", "'none' or 'layer_norm'",
        )
    return normalize == "layer_norm"


def _saelens_k(cfg: Mapping[str, Any], d_sae: int, cfg_file: Path) -> int:
    """A TopK SAE's k: ``k`` in SAELens 6, ``activation_fn_kwargs.k`` before."""
    if "k" in cfg:
        return _topk_k(cfg["k"], d_sae, cfg_file, "k")
    return _topk_k((cfg.get("activation_fn_kwargs") or {}).get("k"), d_sae, cfg_file, "activation_fn_kwargs.k")


def _reject_saelens_scaling(weights: _Weights) -> None:
    scale_key = _first_present(weights, "scaling_factor", "finetuning_scaling_factor")
    if scale_key is not None and not bool((weights.raw(scale_key) == 1).all()):
        raise _reject(
            weights.path, scale_key, "not all ones",
            "Decoded features are scaled by a fine-tuning factor the SAE math does not have.", "all ones or absent",
        )


def _saelens_threshold(weights: _Weights, d_sae: int) -> torch.Tensor:
    if "threshold" not in weights and "log_threshold" in weights:
        # Older SAELens JumpReLU checkpoints store log θ; SAELens converts with exp as well.
        return weights.tensor("log_threshold", (d_sae,), "[d_sae]").exp()
    return weights.tensor("threshold", (d_sae,), "[d_sae]")


def _load_gemma_scope(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    parts = [p.lower() for p in weights_file.parent.parts]
    _reject_gemma_scope_non_saes(weights_file, parts)
    path_layer, point = _gemma_scope_site(parts)
    with _open_weights(weights_file, reading) as weights:
        enc_key = _first_present(weights, "W_enc", "w_enc") or "W_enc"
        dec_key = _first_present(weights, "W_dec", "w_dec") or "W_dec"
        d_in, d_sae = _matrix_shape(weights, enc_key, "Gemma Scope stores the encoder as a [d_in, d_sae] matrix.")
        return Checkpoint(
            W_enc=weights.tensor(enc_key, (d_in, d_sae), "[d_in, d_sae]"),
            W_dec=weights.tensor(dec_key, (d_sae, d_in), f"[d_sae, d_in] to match {enc_key}"),
            b_enc=weights.tensor("b_enc", (d_sae,), "[d_sae]"),
            b_dec=weights.tensor("b_dec", (d_in,), "[d_in]"),
            activation="jumprelu",
            threshold=weights.tensor("threshold", (d_sae,), "[d_sae], one per feature"),
            k=None,
            # Gemma Scope encodes x itself; b_dec is only added back on decode.
            apply_b_dec_to_input=False,
            hook_name=_block_hook(layer if layer is not None else path_layer, point),
        )


def _reject_gemma_scope_non_saes(weights_file: Path, parts: list[str]) -> None:
    for part in parts:
        if re.search(r"transcoder|^clt", part) or part == "embedding":
            raise _reject(
                weights_file, "path", part,
                "Gemma Scope transcoders map one site to another and embedding SAEs need a "
                "d_model rescale, so neither is a plain SAE.", "the res, mlp and att SAEs",
            )


def _matrix_shape(weights: _Weights, key: str, why: str) -> tuple[int, int]:
    """The shape of the matrix ``key``, whose shape the config does not give."""
    shape = tuple(weights.raw(key).shape)
    if len(shape) != 2:
        raise ValueError(f"{weights.path}: tensor {key!r} has shape {shape}, expected a matrix. {why} Check the file.")
    return shape


def _gemma_scope_site(parts: list[str]) -> tuple[int | None, str]:
    """Layer and hook point from a Gemma Scope path (deepest folder wins; resid_post by default).

    Gemma Scope 1 releases are named ``gemma-scope-<model>-{res,mlp,att}`` with ``layer_{L}/``
    folders; Gemma Scope 2 uses ``{resid_post,mlp_out,attn_out}[_all]/layer_{L}_...`` folders.
    The attention SAEs read the concatenated heads, TransformerLens ``attn.hook_z``.
    """
    layer = next((int(m.group(1)) for p in reversed(parts) if (m := re.match(r"layer_(\d+)(?:_|$)", p))), None)
    points = (
        (r"^resid_post|^gemma-scope.*-res(?:-|$)", "hook_resid_post"),
        (r"^mlp_out|^gemma-scope.*-mlp(?:-|$)", "hook_mlp_out"),
        (r"^attn_out|^gemma-scope.*-att(?:-|$)", "attn.hook_z"),
    )
    for part in reversed(parts):
        # HF cache folders look like models--google--gemma-scope-2b-pt-res.
        name = part.rsplit("--", 1)[-1]
        for pattern, point in points:
            if re.search(pattern, name):
                return layer, point
    return layer, "hook_resid_post"


def _load_sparsify(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    cfg_file = weights_file.parent / SPARSIFY_CFG
    cfg = _read_json(cfg_file)
    _reject_sparsify_extras(cfg, cfg_file)
    d_in = _cfg_int(cfg, "d_in", cfg_file)
    # sparsify: num_latents = 0 (its default) means d_in * expansion_factor.
    if cfg.get("num_latents"):
        d_sae = _cfg_int(cfg, "num_latents", cfg_file)
    else:
        d_sae = d_in * _cfg_int(cfg, "expansion_factor", cfg_file)
    k = _topk_k(cfg.get("k"), d_sae, cfg_file, "k")
    with _open_weights(weights_file, reading) as weights:
        return Checkpoint(
            # encoder.weight.T is a [d_in, d_sae] view: no copy
            W_enc=weights.tensor("encoder.weight", (d_sae, d_in), "[num_latents, d_in], nn.Linear layout").T,
            W_dec=weights.tensor("W_dec", (d_sae, d_in), "[num_latents, d_in]"),
            b_enc=weights.tensor("encoder.bias", (d_sae,), "[num_latents]"),
            b_dec=weights.tensor("b_dec", (d_in,), "[d_in]"),
            activation="topk", threshold=None, k=k,
            apply_b_dec_to_input=True,  # sparsify encodes x - b_dec
            hook_name=_sparsify_hook(weights_file.parent.name, layer),
        )


def _reject_sparsify_extras(cfg: Mapping[str, Any], cfg_file: Path) -> None:
    for key, ok, why in (
        ("activation", ("topk",), "Only TopK matches the SAE math; groupmax picks one feature per group."),
        ("transcode", (False,), "A transcoder predicts a module's output from its input, not one site's SAE."),
        ("skip_connection", (False,), "A linear skip term W_skip is not part of the SAE math."),
        ("signed", (False,), "Signed activations skip the ReLU that TopK here applies."),
    ):
        value = cfg.get(key, ok[0])
        if value not in ok:
            raise _reject(cfg_file, key, value, why, repr(ok[0]))


def _sparsify_hook(hookpoint: str, layer: int | None) -> str | None:
    """``layers.{L}`` → resid_post, ``layers.{L}.mlp`` → mlp_out, ``layers.{L}.self_attn`` → attn_out.

    sparsify names the folder after the module whose output it read; anything else is unknown.
    On models with a post-branch norm (Gemma 2/3) the ``mlp``/``self_attn`` outputs sparsify read
    are before that norm, while DESIGN's mlp_out/attn_out are after it; elsewhere they coincide.
    """
    match = re.search(r"(?:^|\.)layers\.(\d+)(?:\.(mlp|self_attn))?$", hookpoint)
    if match is None:
        return None
    point = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out"}[match.group(2)]
    return _block_hook(layer if layer is not None else int(match.group(1)), point)


class _DictionaryClass(NamedTuple):
    """How one dictionary_learning autoencoder class stores the DESIGN §4 math in its ``ae.pt``."""

    linear: bool  # nn.Linear layout (encoder.weight [F, D], decoder.weight [D, F], encoder.bias), else W_enc/W_dec/b_enc
    b_dec_key: str
    activation: str
    threshold: str | None  # "scalar" (one θ for all features), "per_feature", or None
    apply_b_dec_to_input: bool


# Each class's inference-time encode (dictionary.py, trainers/*.py), pre = encoder(x [- b_dec]):
_DICTIONARY_LEARNING_CLASSES: dict[str, _DictionaryClass] = {
    # relu(pre), with x - bias; decode decoder(f) + bias.
    "AutoEncoder": _DictionaryClass(True, "bias", "relu", None, True),
    # topk(relu(pre)). Its `threshold` buffer only serves encode(use_threshold=True), not the default.
    "AutoEncoderTopK": _DictionaryClass(True, "b_dec", "topk", None, True),
    # relu(pre) * (relu(pre) > θ), one θ learned in training (-1 if never set: plain relu).
    "BatchTopKSAE": _DictionaryClass(True, "b_dec", "jumprelu", "scalar", True),
    # As BatchTopKSAE, stored as W_enc/W_dec parameters.
    "MatryoshkaBatchTopKSAE": _DictionaryClass(False, "b_dec", "jumprelu", "scalar", True),
    # relu(pre * (pre > θ)) with x itself (its apply_b_dec_to_input is False unless set after loading).
    "JumpReluAutoEncoder": _DictionaryClass(False, "b_dec", "jumprelu", "per_feature", False),
}


def _load_dictionary_learning(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    cfg_file = weights_file.parent / DICTIONARY_LEARNING_CFG
    trainer = _dictionary_learning_trainer(cfg_file)
    spec = _DICTIONARY_LEARNING_CLASSES[trainer["dict_class"]]
    d_in, d_sae = _cfg_int(trainer, "activation_dim", cfg_file), _cfg_int(trainer, "dict_size", cfg_file)
    with _open_weights(weights_file, reading) as weights:
        W_enc, W_dec, b_enc = _dictionary_matrices(weights, spec.linear, d_in, d_sae)
        return Checkpoint(
            W_enc=W_enc, W_dec=W_dec, b_enc=b_enc,
            b_dec=weights.tensor(spec.b_dec_key, (d_in,), "[activation_dim]"),
            activation=spec.activation,
            threshold=_dictionary_threshold(weights, spec.threshold, d_sae),
            k=_dictionary_k(weights, trainer, d_sae, cfg_file) if spec.activation == "topk" else None,
            apply_b_dec_to_input=spec.apply_b_dec_to_input,
            hook_name=_dictionary_learning_hook(trainer, layer),
        )


def _dictionary_learning_trainer(cfg_file: Path) -> Mapping[str, Any]:
    """The ``trainer`` entry of config.json, checked to name a class this library can run."""
    trainer = _read_json(cfg_file).get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(
            f"{cfg_file}: missing config key 'trainer'. dictionary_learning writes the autoencoder's "
            "class and shape there. Use the config.json saved next to ae.pt."
        )
    if trainer.get("dict_class") not in _DICTIONARY_LEARNING_CLASSES:
        raise _reject(
            cfg_file, "trainer.dict_class", trainer.get("dict_class"),
            "Only these autoencoders have the encode/decode of DESIGN §4.", f"{sorted(_DICTIONARY_LEARNING_CLASSES)}",
        )
    return trainer


def _dictionary_matrices(
    w: _Weights, linear: bool, d_in: int, d_sae: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc [F]``; nn.Linear weights as transposed views, no copy."""
    if linear:
        return _linear_sae(w, ("encoder.weight", "decoder.weight", "encoder.bias"), d_in, d_sae)
    return (
        w.tensor("W_enc", (d_in, d_sae), "[activation_dim, dict_size]"),
        w.tensor("W_dec", (d_sae, d_in), "[dict_size, activation_dim]"),
        w.tensor("b_enc", (d_sae,), "[dict_size]"),
    )


def _linear_sae(
    w: _Weights, keys: tuple[str, str, str], d_in: int, d_sae: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc [F]`` from nn.Linear weights ``keys`` = (encoder
    ``[F, D]``, decoder ``[D, F]``, encoder bias ``[F]``); the matrices as transposed views, no copy."""
    encoder, decoder, bias = keys
    return (
        w.tensor(encoder, (d_sae, d_in), "[d_sae, d_in], nn.Linear layout").T,
        w.tensor(decoder, (d_in, d_sae), "[d_in, d_sae], nn.Linear layout").T,
        w.tensor(bias, (d_sae,), "[d_sae]"),
    )


def _dictionary_threshold(w: _Weights, kind: str | None, d_sae: int) -> torch.Tensor | None:
    if kind == "scalar":
        return w.tensor("threshold", (), "a scalar").expand(d_sae).contiguous()
    if kind == "per_feature":
        return w.tensor("threshold", (d_sae,), "[dict_size]")
    return None


def _dictionary_k(w: _Weights, trainer: Mapping[str, Any], d_sae: int, cfg_file: Path) -> int:
    """A TopK autoencoder's k: ``trainer.k`` in config.json, else the ``k`` buffer in ae.pt."""
    if "k" in trainer:
        return _topk_k(trainer["k"], d_sae, cfg_file, "trainer.k")
    k_raw = w.raw("k")
    return _topk_k(int(k_raw) if k_raw.numel() == 1 else None, d_sae, w.path, "k")


def _dictionary_learning_hook(trainer: Mapping[str, Any], layer: int | None) -> str | None:
    """From ``submodule_name`` like ``resid_post_layer_3``; without one, resid_post of ``trainer.layer``.

    The resid_post default is what SAELens assumes for these checkpoints. A submodule name this
    does not recognise gives ``None`` rather than a guess.
    """
    submodule = trainer.get("submodule_name")
    file_layer = trainer.get("layer") if isinstance(trainer.get("layer"), int) else None
    if submodule is None:
        point = "hook_resid_post"
    else:
        match = re.fullmatch(r"(resid_pre|resid_mid|resid_post|attn_out|mlp_out)_layer_(\d+)", str(submodule))
        if match is None:
            return None
        point, file_layer = f"hook_{match.group(1)}", int(match.group(2))
    return _block_hook(layer if layer is not None else file_layer, point)


def _load_goodfire(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    """Goodfire's released Llama 3 SAEs: ``f = relu(x @ W_enc.T + b_enc)``, ``x_hat = f @ W_dec.T + b_dec``.

    The layout (nn.Linear ``encoder_linear`` [F, D] and ``decoder_linear`` [D, F], ReLU, no b_dec
    subtraction) is the ``SparseAutoEncoder`` of Goodfire's model card, as SAELens's ``goodfire``
    loader also reads it. The file has no config, so the shapes come from ``encoder_linear.weight``.
    """
    with _open_weights(weights_file, reading) as weights:
        d_sae, d_in = _matrix_shape(weights, "encoder_linear.weight", "Goodfire stores it as nn.Linear [d_sae, d_in].")
        keys = ("encoder_linear.weight", "decoder_linear.weight", "encoder_linear.bias")
        W_enc, W_dec, b_enc = _linear_sae(weights, keys, d_in, d_sae)
        return Checkpoint(
            W_enc=W_enc, W_dec=W_dec, b_enc=b_enc,
            b_dec=weights.tensor("decoder_linear.bias", (d_in,), "[d_in]"),
            activation="relu", threshold=None, k=None,
            apply_b_dec_to_input=False,  # Goodfire encodes x itself
            hook_name=_goodfire_hook(weights_file.name, layer),
        )


def _goodfire_hook(file_name: str, layer: int | None) -> str | None:
    """resid_post of the layer in the release's file name (``Llama-3.1-8B-Instruct-SAE-l19.pth``).

    Goodfire trained on the output of ``model.layers.{L}``, TransformerLens ``blocks.{L}.hook_resid_post``.
    """
    match = re.search(r"-SAE-l(\d+)\.pth?$", file_name, re.IGNORECASE)
    file_layer = None if match is None else int(match.group(1))
    return _block_hook(layer if layer is not None else file_layer, "hook_resid_post")


# OpenAI's sparse_autoencoder/model.py (github.com/openai/sparse_autoencoder; not on the package
# index, whose "sparse_autoencoder" is another project): an ``{layer}.pt`` file is
# ``Autoencoder.state_dict()``, its parameters and buffers plus the activation's class name and state.
_OPENAI_META = ("activation", "activation_state_dict")
# Names no other format's state dict uses: a file with any of them is read as OpenAI's, so that a
# missing key is reported by name rather than as an unknown layout.
_OPENAI_MARKERS = ("pre_bias", "latent_bias", *_OPENAI_META)
# sparse_autoencoder/paths.py's locations -> the TransformerLens hook its README reads each one from.
_OPENAI_LOCATIONS = {
    "mlp_post_act": "mlp.hook_post",
    "resid_delta_attn": "hook_attn_out",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_post_mlp": "hook_resid_post",
}


def _load_openai(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    """OpenAI's GPT-2 small autoencoders, as ``Autoencoder.from_state_dict`` builds them:

        latents = act(LN(x) - pre_bias) @ encoder.weight.T + latent_bias)
        recons  = (latents @ decoder.weight.T + pre_bias) * std + mu

    ``LN`` (``layer_norm_input``) is on exactly when ``activation`` is ``"TopK"`` (model.py's own
    rule); ``"ReLU"`` (or no ``activation`` entry, the v1/v4 releases) is a plain ReLU SAE. TopK is
    ``relu`` of the ``k`` largest pre-activations, the same features as TopK of ``relu(pre)``.
    """
    tensors, activation, options = _openai_state(weights_file)
    act, k_value, normalize = _openai_activation(activation, options, weights_file)
    weights = _Weights(weights_file, set(tensors), tensors.__getitem__, (), reading)
    d_sae, d_in = _matrix_shape(weights, "encoder.weight", "OpenAI stores it as nn.Linear [n_latents, n_inputs].")
    W_enc, W_dec, b_enc = _linear_sae(weights, ("encoder.weight", "decoder.weight", "latent_bias"), d_in, d_sae)
    return Checkpoint(
        W_enc=W_enc, W_dec=W_dec, b_enc=b_enc,
        b_dec=weights.tensor("pre_bias", (d_in,), "[n_inputs]"),
        activation=act, threshold=None,
        k=None if k_value is None else _topk_k(k_value, d_sae, weights_file, "activation_state_dict.k"),
        apply_b_dec_to_input=True,  # encode_pre_act subtracts pre_bias
        hook_name=_openai_hook(weights_file, layer),
        layer_norm_input=normalize,
    )


def _openai_state(path: Path) -> tuple[dict[str, torch.Tensor], object, object]:
    """The tensors of an OpenAI ``{layer}.pt``, its ``activation`` name (default ``"ReLU"``, as
    ``from_state_dict``) and its ``activation_state_dict`` (default empty)."""
    state = _torch_load(path)
    if not isinstance(state, Mapping):
        raise _not_a_state_dict(path, state)
    tensors = {key: value for key, value in state.items() if key not in _OPENAI_META}
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor. Only "
                f"{list(_OPENAI_META)} hold other values in Autoencoder.state_dict(). Re-save the autoencoder."
            )
    return tensors, state.get("activation", "ReLU"), state.get("activation_state_dict", {})


def _openai_activation(name: object, options: object, path: Path) -> tuple[str, int | None, bool]:
    """``(activation, k, layer_norm_input)`` from model.py's activation class name and state."""
    if name == "ReLU":
        return "relu", None, False
    if name != "TopK":
        raise _reject(path, "activation", name, "Only these activations are SAE activations here.", "'TopK' or 'ReLU'")
    if not isinstance(options, Mapping) or "k" not in options or "postact_fn" not in options:
        raise ValueError(
            f"{path}: missing 'activation_state_dict.k' or 'activation_state_dict.postact_fn' (got {options!r}). "
            "TopK.from_state_dict needs both to rebuild the activation. Re-save the autoencoder."
        )
    if options["postact_fn"] != "ReLU":
        raise _reject(
            path, "activation_state_dict.postact_fn", options["postact_fn"],
            "Without the ReLU after TopK, negative pre-activations can fire, which TopK here does not allow.",
            "'ReLU'",
        )
    return "topk", options["k"], True


def _openai_hook(weights_file: Path, layer: int | None) -> str | None:
    """From the release path ``{location}[_{version}]/autoencoders/{layer}.pt`` (sparse_autoencoder/paths.py)."""
    file_layer = int(weights_file.stem) if weights_file.stem.isdigit() else None
    point = next(
        (hook for part in reversed(weights_file.parent.parts) for location, hook in _OPENAI_LOCATIONS.items()
         if re.fullmatch(rf"{location}(?:_v[0-9a-z_]+)?", part)),
        None,
    )
    return _block_hook(layer if layer is not None else file_layer, point)


class _LlamaScope(NamedTuple):
    """The math ``hyperparams.json`` sets, in the terms of Language-Model-SAEs' loader (below)."""

    d_model: int
    d_sae: int
    activation: str
    threshold: float | None  # jumprelu only
    k: int | None  # topk only
    in_factor: float  # sqrt(d_model) / dataset norm of the input (1: no dataset-wise norm)
    out_factor: float  # the same for the output
    unit_decoder: bool  # sparsity_include_decoder_norm: decoder norms are moved into the encoder
    apply_b_dec_to_input: bool
    decoder_bias: bool
    hook: str


def _load_llama_scope(weights_file: Path, layer: int | None, reading: _Reading) -> Checkpoint:
    """Llama Scope (fnlp/Llama3_1-8B-Base-LX{R,A,M}-{8x,32x}) as Language-Model-SAEs loads it.

    The release's library (OpenMOSS/Language-Model-SAEs ``src/lm_saes/sae.py`` at the "Llama Scope
    SAEs" commit 4ec6f0aa, ``SparseAutoEncoder.from_config``) rescales the stored weights and then
    runs plain ``x @ E.T + b_e``, ``act``, ``f @ D.T + b_d``; this loader makes the same two steps
    (``_fold_llama_scope``), so the SAE's encode and decode are that library's. An ``act_fn`` of
    ``topk`` with a positive ``jump_relu_threshold`` runs as JumpReLU, as that loader converts it.
    SAELens's ``llama_scope`` loader differs: it folds only the input norm into ``W_enc``, so its
    features are ``sqrt(d_model) / norm_in`` times these, and it ignores the decoder norms.
    """
    cfg_file = weights_file.parent.parent / LLAMA_SCOPE_CFG
    spec = _llama_scope_spec(_read_json(cfg_file), cfg_file)
    d, f = spec.d_model, spec.d_sae
    with _open_weights(weights_file, reading) as weights:
        W_enc, W_dec, b_enc = _linear_sae(weights, ("encoder.weight", "decoder.weight", "encoder.bias"), d, f)
        # use_decoder_bias=False: the nn.Linear decoder has no bias, the same as a zero one.
        b_dec = weights.tensor("decoder.bias", (d,), "[d_model]") if spec.decoder_bias else W_enc.new_zeros(d)
    W_enc, b_enc, W_dec, b_dec = _fold_llama_scope(W_enc, b_enc, W_dec, b_dec, spec)
    return Checkpoint(
        W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
        activation=spec.activation,
        threshold=None if spec.threshold is None else torch.full_like(b_enc, spec.threshold),
        k=spec.k, apply_b_dec_to_input=spec.apply_b_dec_to_input,
        hook_name=_relayer(spec.hook, layer, cfg_file),
    )


def _fold_llama_scope(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, spec: _LlamaScope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W_enc [D, F]``, ``b_enc [F]``, ``W_dec [F, D]``, ``b_dec [D]`` as the library uses them, from
    the stored weights (``W_enc = E.T``, ``W_dec = D.T`` of its nn.Linear ``E`` and ``D``).

    1. ``standardize_parameters_of_dataset_activation_scaling``: the input is used unscaled, so
       ``b_e / s_in``, ``b_d / s_out``, ``D * s_in / s_out`` (``s = sqrt(d_model) / norm``).
    2. ``transform_to_unit_decoder_norm``, when ``sparsity_include_decoder_norm``: each feature's
       decoder norm ``n_i`` (of the step-1 decoder) moves to its encoder row and bias, ``D / n``,
       ``E * n``, ``b_e * n``. A feature with a zero decoder (which the library turns into NaN) keeps a
       zero decoder and gets a zero encoder: it never fires and writes nothing.
    Computed in at least fp32 (the library does it in the stored dtype), then cast back.
    """
    dtype = W_enc.dtype
    work = torch.promote_types(dtype, torch.float32)
    b_enc = b_enc.to(work) / spec.in_factor  # [F]
    b_dec = b_dec.to(work) / spec.out_factor  # [D]
    W_dec = W_dec.to(work) * (spec.in_factor / spec.out_factor)  # [F, D]
    W_enc = W_enc.to(work)  # [D, F]
    if spec.unit_decoder:
        norm = W_dec.norm(dim=1)  # [F], each feature's decoder norm
        W_dec = W_dec / torch.where(norm > 0, norm, 1.0)[:, None]
        W_enc = W_enc * norm
        b_enc = b_enc * norm
    return W_enc.to(dtype), b_enc.to(dtype), W_dec.to(dtype), b_dec.to(dtype)


def _llama_scope_spec(cfg: Mapping[str, Any], cfg_file: Path) -> _LlamaScope:
    """Read and check ``hyperparams.json``; options it leaves out take SAEConfig's defaults."""
    d_model, d_sae = _cfg_int(cfg, "d_model", cfg_file), _cfg_int(cfg, "d_sae", cfg_file)
    _reject_llama_scope_extras(cfg, cfg_file)
    activation, threshold, k = _llama_scope_activation(cfg, d_sae, cfg_file)
    in_factor, out_factor = _llama_scope_norm_factors(cfg, d_model, cfg_file)
    return _LlamaScope(
        d_model=d_model, d_sae=d_sae, activation=activation, threshold=threshold, k=k,
        in_factor=in_factor, out_factor=out_factor,
        unit_decoder=_cfg_bool(cfg, "sparsity_include_decoder_norm", True, cfg_file),
        apply_b_dec_to_input=_cfg_bool(cfg, "apply_decoder_bias_to_pre_encoder", True, cfg_file),
        decoder_bias=_cfg_bool(cfg, "use_decoder_bias", True, cfg_file),
        hook=_cfg_value(cfg, "hook_point_in", cfg_file, "It names the site the SAE reads.", str),
    )


def _reject_llama_scope_extras(cfg: Mapping[str, Any], cfg_file: Path) -> None:
    if _cfg_bool(cfg, "use_glu_encoder", False, cfg_file):
        raise _reject(cfg_file, "use_glu_encoder", True, "A sigmoid-gated encoder is not the SAE math.", "false")
    hook_in = cfg.get("hook_point_in")
    if cfg.get("hook_point_out", hook_in) != hook_in:
        raise _reject(
            cfg_file, "hook_point_out", cfg["hook_point_out"],
            f"It differs from hook_point_in {hook_in!r}: a transcoder maps one site to another, not one site's SAE.",
            "hook_point_out equal to hook_point_in",
        )


def _llama_scope_activation(cfg: Mapping[str, Any], d_sae: int, cfg_file: Path) -> tuple[str, float | None, int | None]:
    """``(activation, threshold, k)``. Language-Model-SAEs' JumpReLU is ``where(pre > θ, pre, 0)``,
    the SAE math's ``relu(pre) * (pre > θ)`` for ``θ >= 0``; a negative θ would differ, so it is refused."""
    act_fn = _cfg_value(cfg, "act_fn", cfg_file, "It names the activation.", str).lower()
    if act_fn not in ("relu", "jumprelu", "topk"):
        raise _reject(cfg_file, "act_fn", act_fn, "Only these activations are SAE activations here.",
                      "'relu', 'jumprelu' or 'topk'")
    # The threshold is required for jumprelu; for topk, absent means 0 (SAEConfig's default): no conversion.
    threshold = _cfg_value(cfg, "jump_relu_threshold", cfg_file, "It is the JumpReLU threshold.", (int, float)) \
        if act_fn == "jumprelu" else cfg.get("jump_relu_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
        raise _reject(cfg_file, "jump_relu_threshold", threshold,
                      "Language-Model-SAEs' JumpReLU passes pre-activations above a negative threshold, "
                      "which the SAE math's JumpReLU does not.", "a finite number >= 0")
    if act_fn == "jumprelu" or (act_fn == "topk" and threshold > 0):
        return "jumprelu", float(threshold), None
    if act_fn == "topk":
        return "topk", None, _topk_k(cfg.get("top_k"), d_sae, cfg_file, "top_k")
    return "relu", None, None


def _llama_scope_norm_factors(cfg: Mapping[str, Any], d_model: int, cfg_file: Path) -> tuple[float, float]:
    """``(s_in, s_out)``: ``sqrt(d_model) / dataset_average_activation_norm.{in,out}`` for
    ``norm_activation="dataset-wise"``; ``(1, 1)`` for ``"inference"`` (already folded)."""
    norm = _cfg_value(cfg, "norm_activation", cfg_file, "It says how inputs were scaled.", str)
    if norm == "inference":
        return 1.0, 1.0
    if norm != "dataset-wise":
        raise _reject(cfg_file, "norm_activation", norm,
                      "Token- and batch-wise norms rescale each input by its own norm, which is not a "
                      "constant that folds into the weights.", "'dataset-wise' or 'inference'")
    norms = _cfg_value(cfg, "dataset_average_activation_norm", cfg_file, "Dataset-wise scaling needs it.", dict)
    factors = []
    for side in ("in", "out"):
        value = norms.get(side)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(
                f"{cfg_file}: config key 'dataset_average_activation_norm.{side}' must be a positive number, "
                f"got {value!r}. Dataset-wise scaling divides by it. Fix the config."
            )
        factors.append(d_model**0.5 / value)
    return factors[0], factors[1]


_LOADERS: dict[str, Callable[[Path, int | None, _Reading], Checkpoint]] = {
    "saelens": _load_saelens,
    "gemma_scope": _load_gemma_scope,
    "sparsify": _load_sparsify,
    "dictionary_learning": _load_dictionary_learning,
    "goodfire": _load_goodfire,
    "openai": _load_openai,
    "llama_scope": _load_llama_scope,
}


# --------------------------------------------------------------------------------------- saving


def _saelens_cfg_of(sae: SAEFields) -> dict[str, Any]:
    """A SAELens cfg.json for ``sae``, readable by SAELens 6 and by its pre-6.0 compatibility path."""
    architecture = {ours: theirs for theirs, ours in _SAELENS_ARCHITECTURES.items()}[sae.activation]
    d_in, d_sae = sae.W_enc.shape
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."),
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        # SAELens's "layer_norm" is layer_norm_input's LN (eps 1e-5, unbiased std, x_hat * std + mu).
        "normalize_activations": "layer_norm" if sae.layer_norm_input else "none",
        # SAELens flattens [.., heads, d_head] input for hook_z SAEs; the math is unchanged.
        "reshape_activations": "hook_z" if (sae.hook_name or "").endswith("hook_z") else "none",
        # SAELens 6 reads metadata.hook_name; configs without a sae_lens_version take the
        # top-level one, so write both.
        "hook_name": sae.hook_name,
        "metadata": {"hook_name": sae.hook_name},
    }
    if sae.activation == "topk":
        cfg["k"] = sae.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def _distinct_contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage, as safetensors requires (e.g. a tied W_enc = W_dec.T)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _atomic_write(target: Path, write: Callable[[str], object]) -> None:
    # Write beside the target and rename over it: the old inode stays valid for any live memory
    # map of it (an SAE loaded from this file), and a crash never leaves a half-written file.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
