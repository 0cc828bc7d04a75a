"""SAELens release names: ``(release, sae_id)`` -> ``(repo_id, path_in_repo)`` on the Hugging Face Hub.

``resolve_release`` (behind ``sc.SAE.from_release`` and ``SAE.load("saelens://RELEASE/SAE_ID")``)
asks SAELens's own directory (``sae_lens.loading.pretrained_saes_directory``) when ``sae_lens`` is
installed, so every release SAELens knows resolves exactly as SAELens resolves it. Without
``sae_lens`` it falls back to ``TABLE``, a small table of the major releases kept here.

``TABLE`` was read from ``sae_lens/pretrained_saes.yaml`` of sae-lens 6.54.12; ``tests/test_releases.py``
checks every entry against the installed SAELens directory. It holds:

- Gemma Scope 2B PT, residual / MLP / attention (``gemma-scope-2b-pt-{res,mlp,att}``): ids are the
  repo folders ``layer_L/width_W/average_l0_N`` (res also ``embedding/...``). The table checks the
  form, layer and width but not ``N``: a wrong ``N`` is caught by the Hub, whose error lists the
  folders there are.
- Their ``-canonical`` releases: ``layer_L/width_W/canonical`` -> the ``average_l0_N`` folder SAELens
  names, for every id SAELens ships (widths 16k and 65k at every layer; res also 32k-1m at a few).
- GPT-2 small ``gpt2-small-res-jb``, Llama Scope ``llama_scope_lx{r,a,m}_{8x,32x}``, and Pythia-70m
  deduped ``pythia-70m-deduped-{res,mlp,att}-sm``: every id.

Which format a release is in is not looked up: ``SAE.from_pretrained`` detects it from the folder's
files, as ``SAE.load`` does for a local folder (Llama Scope's ``hyperparams.json`` +
``checkpoints/final.safetensors`` included); a release in a format it does not read resolves, and then
fails there with the folder's files named.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

SAELENS_SCHEME = "saelens://"


class Release(NamedTuple):
    """One release: its Hub repository, ``saes`` (SAE id -> path in the repo), and ``folder``, a
    pattern of further ids that are their own path (Gemma Scope's ``average_l0_N`` folders)."""

    repo_id: str
    saes: Mapping[str, str]
    folder: re.Pattern[str] | None = None


def resolve_release(release: str, sae_id: str) -> tuple[str, str]:
    """``(repo_id, path_in_repo)`` of SAE ``sae_id`` of the SAELens release ``release``.

    Uses SAELens's directory when ``sae_lens`` is importable, else ``TABLE``. Raises ``ValueError``
    naming the release, or the id within it, when either is unknown, with the closest known names
    (or some known names when none is close).
    """
    directory, source = _directory()
    entry = directory.get(release)
    if entry is None:
        raise ValueError(f"Unknown SAELens release {release!r} (in {source}).{_suggest(release, directory)}")
    if sae_id in entry.saes:
        return entry.repo_id, entry.saes[sae_id]
    if entry.folder is not None and entry.folder.fullmatch(sae_id):
        return entry.repo_id, sae_id
    # Folder releases list no ids to match against; their error says the form instead.
    hint = f" Its ids are folders matching {entry.folder.pattern!r}." if entry.folder else _suggest(sae_id, entry.saes)
    raise ValueError(f"Release {release!r} (in {source}) has no SAE id {sae_id!r}.{hint}")


def parse_release_uri(uri: str) -> tuple[str, str]:
    """``(release, sae_id)`` of ``saelens://RELEASE/SAE_ID``: release names hold no ``/``, so the
    first ``/`` ends the release and the rest (which may hold ``/``) is the SAE id."""
    release, _, sae_id = uri.removeprefix(SAELENS_SCHEME).partition("/")
    if not release or not sae_id:
        raise ValueError(
            f"{uri!r}: expected saelens://RELEASE/SAE_ID, e.g. "
            "saelens://gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical."
        )
    return release, sae_id


def _directory() -> tuple[Mapping[str, Release], str]:
    """The releases to resolve against, and where they come from (for error messages): SAELens's
    directory when ``sae_lens`` can be imported, else ``TABLE``."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        return TABLE, _TABLE_SOURCE  # not installed: the table stands in
    # SAELens's PretrainedSAELookup: repo_id, and saes_map (SAE id -> path in the repo).
    lookups = get_pretrained_saes_directory()
    releases = {name: Release(lookup.repo_id, lookup.saes_map) for name, lookup in lookups.items()}
    return releases, "SAELens's directory"


def _suggest(name: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if close:
        return f" Close matches: {close}."
    more = f" (and {len(known) - 20} more)" if len(known) > 20 else ""
    return f" Known: {known[:20]}{more}."


# ------------------------------------------------------------------------------------------ table

_TABLE_SOURCE = "sae_compile's table of major releases; pip install sae-lens for all of SAELens's"

# Gemma Scope 2B PT canonical folders: release -> width -> average_l0 N by layer (a list covers
# layers 0..25; a dict only the layers listed). From sae-lens 6.54.12's pretrained_saes.yaml.
_GEMMA_CANONICAL_L0: dict[str, dict[str, list[int] | dict[int, int]]] = {
    "res": {
        "16k": [105, 102, 141, 59, 124, 68, 70, 69, 71, 73, 77, 80, 82, 84, 84, 78, 78, 77, 74, 73, 71, 70, 72, 75, 73, 116],
        "65k": [73, 121, 77, 89, 89, 105, 107, 107, 111, 118, 128, 70, 72, 75, 73, 127, 128, 125, 116, 115, 114, 111, 116, 123, 124, 93],
        "32k": {12: 76},
        "262k": {12: 121},
        "524k": {12: 115},
        "1m": {5: 114, 12: 107, 19: 88},
    },
    "mlp": {
        "16k": [119, 105, 95, 95, 85, 114, 133, 60, 136, 88, 110, 98, 108, 112, 97, 80, 72, 68, 106, 109, 109, 113, 121, 128, 73, 126],
        "65k": [72, 127, 134, 68, 66, 86, 101, 115, 110, 77, 95, 88, 96, 98, 89, 72, 66, 136, 88, 88, 88, 86, 92, 102, 128, 107],
    },
    "att": {
        "16k": [104, 79, 93, 117, 116, 135, 61, 99, 129, 127, 70, 80, 85, 92, 71, 98, 71, 79, 72, 122, 62, 65, 106, 73, 96, 77],
        "65k": [75, 98, 125, 83, 87, 99, 112, 96, 112, 107, 67, 75, 79, 87, 66, 90, 129, 70, 123, 106, 102, 118, 112, 140, 77, 63],
    },
}
# Widths of the non-canonical folders (res's embedding SAEs are width 4k).
_GEMMA_WIDTHS = {"res": "4k|16k|32k|65k|131k|262k|524k|1m", "mlp": "16k|65k", "att": "16k|65k"}


def _gemma_canonical(site: str) -> dict[str, str]:
    saes = {}
    for width, l0s in _GEMMA_CANONICAL_L0[site].items():
        by_layer = dict(enumerate(l0s)) if isinstance(l0s, list) else l0s
        for layer, l0 in by_layer.items():
            saes[f"layer_{layer}/width_{width}/canonical"] = f"layer_{layer}/width_{width}/average_l0_{l0}"
    return saes


def _gemma_folder(site: str) -> re.Pattern[str]:
    layer = r"(?:[0-9]|1[0-9]|2[0-5])"  # layers 0..25 of Gemma 2 2B
    where = rf"(?:layer_{layer}|embedding)" if site == "res" else rf"layer_{layer}"
    return re.compile(rf"{where}/width_(?:{_GEMMA_WIDTHS[site]})/average_l0_[0-9]+")


def _table() -> dict[str, Release]:
    table: dict[str, Release] = {}
    for site in ("res", "mlp", "att"):
        repo = f"google/gemma-scope-2b-pt-{site}"
        table[f"gemma-scope-2b-pt-{site}"] = Release(repo, {}, _gemma_folder(site))
        table[f"gemma-scope-2b-pt-{site}-canonical"] = Release(repo, _gemma_canonical(site))
    gpt2 = [f"blocks.{layer}.hook_resid_pre" for layer in range(12)] + ["blocks.11.hook_resid_post"]
    table["gpt2-small-res-jb"] = Release("jbloom/GPT2-Small-SAEs-Reformatted", {i: i for i in gpt2})
    for site in "ram":  # residual, attention, MLP
        for width in ("8x", "32x"):
            name = f"Llama3_1-8B-Base-L{{}}{site.upper()}-{width}"
            saes = {f"l{layer}{site}_{width}": name.format(layer) for layer in range(32)}
            table[f"llama_scope_lx{site}_{width}"] = Release(f"fnlp/{name.format('X')}", saes)
    pythia = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "hook_attn_out"}
    for site, hook in pythia.items():
        saes = {f"blocks.{layer}.{hook}": f"{layer}-{site}-sm" for layer in range(6)}
        if site == "res":  # the embedding SAE is SAELens's resid_pre of block 0
            saes = {"blocks.0.hook_resid_pre": "e-res-sm", **saes}
        table[f"pythia-70m-deduped-{site}-sm"] = Release(f"ctigges/pythia-70m-deduped__{site}-sm_processed", saes)
    return table


#: The releases known without ``sae_lens``: release name -> ``Release``.
TABLE: Mapping[str, Release] = _table()
