"""Read SAE checkpoints from the Hugging Face Hub, downloading only the files one SAE needs.

``read_hub_checkpoint(repo_id, path_in_repo)`` (behind ``sc.SAE.from_pretrained`` and
``SAE.load("hf://...")``) lists the folder ``path_in_repo`` of the repository, picks the files by the
same rule as a local folder (``sae_compile.checkpoints.checkpoint_files``), fetches those with
``huggingface_hub.hf_hub_download`` into the normal Hugging Face cache, and reads them with
``read_checkpoint``. A Hub repository with thousands of SAEs (Gemma Scope) therefore costs one
folder listing and the two or so files of the SAE asked for.

With ``HF_HUB_OFFLINE=1`` nothing is requested from the network: the folder listing comes from the
cached snapshot of the revision, and ``hf_hub_download`` serves the files from the cache.

``huggingface_hub`` is an optional dependency (``pip install "sae-compile[hub]"``), imported only
when a Hub checkpoint is read.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from .checkpoints import LAYOUTS, Checkpoint, check_read_options, checkpoint_files, files_for_weights, read_checkpoint

HF_SCHEME = "hf://"
_INSTALL = 'pip install "sae-compile[hub]"'


def read_hub_checkpoint(
    repo_id: str,
    path_in_repo: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    hook_name: str | None = None,
    layer: int | None = None,
) -> Checkpoint:
    """Read the SAE checkpoint in the folder (or weights file) ``path_in_repo`` of the Hub model
    repository ``repo_id`` at ``revision`` (default: the main branch).

    ``path_in_repo=None`` means the repository's top folder. Only the files ``read_checkpoint``
    reads are downloaded, into ``cache_dir`` (default: the Hugging Face cache); ``HF_HUB_OFFLINE=1``
    reads the cache alone. ``dtype``, ``device``, ``hook_name`` and ``layer`` are
    ``read_checkpoint``'s options.

    Raises ``ImportError`` naming the install command without ``huggingface_hub``, and
    ``ValueError`` naming the repo, the path and what is missing: no such repository, revision,
    folder or file (on the Hub, or in the cache when offline), no known checkpoint layout in the
    folder, or a config file the layout needs; plus ``read_checkpoint``'s errors for the files.
    """
    check_read_options(dtype, hook_name, layer)
    hub = _import_hub()
    where = _Where(_check_repo_id(repo_id), _clean_path(path_in_repo), revision)
    # Resolved once, so that the offline listing and the downloads read the same cache.
    cache_dir = cache_dir or hub.constants.HF_HUB_CACHE
    names = _needed_files(hub, where, cache_dir)
    local = [_download(hub, where, name, cache_dir) for name in names]
    return read_checkpoint(local[0], dtype=dtype, device=device, hook_name=hook_name, layer=layer)


def parse_hf_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(repo_id, path_in_repo, revision)`` of ``hf://OWNER/NAME[@REVISION][/PATH/IN/REPO]``.

    The first two path components are the repository id, as in ``huggingface_hub``'s ``hf://``
    file system; ``path_in_repo`` and ``revision`` are ``None`` where the URI has none.
    """
    parts = uri.removeprefix(HF_SCHEME).strip("/").split("/")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(
            f"{uri!r}: expected hf://OWNER/NAME/PATH/IN/REPO (the first two parts are the Hub repository "
            "id, e.g. hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71)."
        )
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", "/".join(parts[2:]) or None, revision or None


# ------------------------------------------------------------------------------------------ steps


class _Where(NamedTuple):
    repo_id: str
    path: str  # "" for the repository's top folder
    revision: str | None

    def __str__(self) -> str:
        return f"Hub repo {self.repo_id!r} (revision {self.revision or 'main'}), path {self.path or '/'!r}"


def _import_hub() -> ModuleType:
    try:
        # The submodules used below, imported by name: the package loads them lazily.
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.file_download
        import huggingface_hub.hf_api
        import huggingface_hub.utils
    except ImportError as e:
        raise ImportError(
            f"Loading SAEs from the Hugging Face Hub needs the huggingface_hub package ({e}). "
            f"Install it with: {_INSTALL}"
        ) from e
    return huggingface_hub


def _check_repo_id(repo_id: object) -> str:
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise TypeError(f"from_pretrained: repo_id must be a Hub repository id like 'OWNER/NAME', got {repo_id!r}.")
    return repo_id.strip("/")


def _clean_path(path_in_repo: object) -> str:
    """``path_in_repo`` without leading/trailing slashes; ``.`` / ``..`` parts are refused, so an
    offline listing cannot leave the cached snapshot."""
    if path_in_repo is None:
        return ""
    if not isinstance(path_in_repo, str):
        raise TypeError(f"from_pretrained: path_in_repo must be a str or None, got {type(path_in_repo).__name__}.")
    path = path_in_repo.strip("/")
    if path and any(part in (".", "..", "") for part in path.split("/")):
        raise ValueError(f"from_pretrained: path_in_repo {path_in_repo!r} must be a plain folder or file path.")
    return path


def _needed_files(hub: ModuleType, where: _Where, cache_dir: str | os.PathLike[str]) -> list[str]:
    """Repo paths of the files to fetch, weights file first, decided from folder listings."""
    offline = hub.constants.HF_HUB_OFFLINE
    list_folder = _cached_lister(hub, where, cache_dir) if offline else _hub_lister(hub, where)
    of = " of the cached snapshot (HF_HUB_OFFLINE is set)" if offline else ""
    if where.path:
        parent, _, name = where.path.rpartition("/")
        siblings = list_folder(parent)
        if name not in siblings:
            raise ValueError(
                f"{where}: no file or folder {name!r} in folder {parent or '/'!r}{of}, which holds "
                f"{sorted(siblings)[:20]}. Check the path."
            )
        if siblings[name]:  # the path names a file: it is the weights file
            return _pick(where, parent, files_for_weights(name), siblings, of)
    entries = list_folder(where.path)
    return _pick(where, where.path, checkpoint_files(_files(entries)), entries, of)


def _pick(where: _Where, folder: str, chosen: list[str] | None, entries: Mapping[str, bool], of: str) -> list[str]:
    """``chosen`` as repo paths, checked to be files of ``folder`` (``of`` says where it was listed)."""
    if chosen is None:
        subfolders = sorted(name for name, is_file in entries.items() if not is_file)
        hint = f" Its subfolders are {subfolders[:10]}; pass one of them as the path." if subfolders else ""
        raise ValueError(
            f"{where}: no SAE checkpoint in this folder{of} (its files: {_files(entries)[:20]}). "
            f"SAE.from_pretrained reads {LAYOUTS}.{hint}"
        )
    missing = [name for name in chosen[1:] if not entries.get(name)]
    if missing:
        raise ValueError(
            f"{where}: the folder{of} has {chosen[0]} but not {missing}, which that format needs next to "
            "its weights to build the SAE. Check the path, or that the upload (or download) is complete."
        )
    return [f"{folder}/{name}" if folder else name for name in chosen]


def _download(hub: ModuleType, where: _Where, name: str, cache_dir: str | os.PathLike[str]) -> str:
    with _hub_errors(where, f"file {name!r}", hub):
        return hub.hf_hub_download(where.repo_id, name, revision=where.revision, cache_dir=cache_dir)


def _files(entries: Mapping[str, bool]) -> list[str]:
    return sorted(name for name, is_file in entries.items() if is_file)


# ---------------------------------------------------------------------------------------- listings

# A folder's entries by name: True for a file, False for a subfolder ({} for no such folder offline).
_Lister = Callable[[str], dict[str, bool]]


def _hub_lister(hub: ModuleType, where: _Where) -> _Lister:
    """Lists a folder of the repository on the Hub: ``{name: is_file}``."""
    api = hub.HfApi()

    def list_folder(folder: str) -> dict[str, bool]:
        with _hub_errors(where, f"folder {folder or '/'!r}", hub):
            entries = api.list_repo_tree(where.repo_id, path_in_repo=folder or None, revision=where.revision)
            return {
                entry.path.rpartition("/")[2]: not isinstance(entry, hub.hf_api.RepoFolder) for entry in entries
            }

    return list_folder


def _cached_lister(hub: ModuleType, where: _Where, cache_dir: str | os.PathLike[str]) -> _Lister:
    """Lists a folder of the cached snapshot of the revision (offline): ``{name: is_file}``.

    The snapshot is found by the cache layout the Hugging Face docs describe: ``refs/<revision>``
    holds the commit, ``snapshots/<commit>/`` its files (a commit hash names its snapshot directly).
    """
    storage = Path(cache_dir) / hub.file_download.repo_folder_name(
        repo_id=where.repo_id, repo_type="model"
    )
    revision = where.revision or "main"
    ref = storage / "refs" / revision
    snapshot = storage / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision)
    if not snapshot.is_dir():
        raise ValueError(
            f"{where}: HF_HUB_OFFLINE is set and the Hugging Face cache at {storage.parent} has no snapshot "
            f"of this repository at revision {revision!r}. Load it once with network access (unset "
            "HF_HUB_OFFLINE), or pass the cache_dir it was downloaded to."
        )

    def list_folder(folder: str) -> dict[str, bool]:
        path = snapshot / folder
        return {p.name: p.is_file() for p in path.iterdir()} if path.is_dir() else {}

    return list_folder


@contextlib.contextmanager
def _hub_errors(where: _Where, what: str, hub: ModuleType) -> Iterator[None]:
    """The Hub's not-found errors as ``ValueError`` naming the repo, the path and ``what``."""
    errors = hub.utils
    try:
        yield
    except errors.LocalEntryNotFoundError as e:
        raise ValueError(
            f"{where}: {what} is not in the local Hugging Face cache, and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE is set, or no connection): {e}. Load it once online."
        ) from e
    except errors.RepositoryNotFoundError as e:
        raise ValueError(
            f"{where}: no such model repository on the Hub, or it is private or gated and this machine "
            "has no token with access (hf auth login). Check the repository id."
        ) from e
    except errors.RevisionNotFoundError as e:
        raise ValueError(f"{where}: the repository has no revision {where.revision!r}. Check the revision.") from e
    except errors.EntryNotFoundError as e:
        raise ValueError(f"{where}: the repository has no {what} at this revision. Check the path.") from e
