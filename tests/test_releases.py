"""SAELens release names -> Hub repository and path, with ``sae_lens`` installed and without it.

With ``sae_lens``, resolution goes through SAELens's own directory; without it (simulated by
making its import fail), through ``sae_compile.releases.TABLE``, which is checked here entry by
entry against the installed SAELens directory. Loading a release end to end reads an offline Hub
cache layout built with ``tests/test_hub.py``'s helpers, under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sae_compile import SAE
from sae_compile.cli import main
from sae_compile.releases import TABLE, parse_release_uri, resolve_release
from tests import test_hub
from tests.test_checkpoints import assert_same_sae
from tests.test_hub import COMMIT, _npz_bytes, hf, write_hub_cache

# tests/test_hub.py's fixtures, used here by name: HF_HUB_OFFLINE set, and the files downloaded.
offline = test_hub.offline
fetched = test_hub.fetched

_SAE_LENS_MODULES = ("sae_lens", "sae_lens.loading", "sae_lens.loading.pretrained_saes_directory")


@pytest.fixture
def without_sae_lens(monkeypatch) -> None:
    """``sae_lens`` made unimportable: a ``None`` in ``sys.modules`` fails its import (the submodules
    too, which an earlier test may have imported)."""
    for name in _SAE_LENS_MODULES:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture(params=["sae_lens", "table"])
def directory(request) -> str:
    """Runs a test once through SAELens's directory and once through the in-package table."""
    if request.param == "sae_lens":
        pytest.importorskip("sae_lens")
    else:
        request.getfixturevalue("without_sae_lens")
    return request.param


def _sae_lens_directory() -> dict:
    pytest.importorskip("sae_lens")
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


# ---------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("release", sorted(TABLE))
def test_table_agrees_with_sae_lens(release) -> None:
    lookup = _sae_lens_directory()[release]
    entry = TABLE[release]
    assert entry.repo_id == lookup.repo_id
    if entry.folder is None:
        assert dict(entry.saes) == lookup.saes_map
    else:  # a folder release: every SAELens id is its own path and has the table's form
        assert not entry.saes
        assert all(path == sae_id and entry.folder.fullmatch(sae_id) for sae_id, path in lookup.saes_map.items())


def test_table_covers_the_major_releases() -> None:
    gemma = {f"gemma-scope-2b-pt-{site}{c}" for site in ("res", "mlp", "att") for c in ("", "-canonical")}
    llama = {f"llama_scope_lx{site}_{width}" for site in "ram" for width in ("8x", "32x")}
    pythia = {f"pythia-70m-deduped-{site}-sm" for site in ("res", "mlp", "att")}
    assert set(TABLE) == gemma | llama | pythia | {"gpt2-small-res-jb"}


# ---------------------------------------------------------------------------------------- resolving

RESOLVED = [
    ("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical",
     "google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71"),
    ("gemma-scope-2b-pt-res-canonical", "layer_12/width_1m/canonical",
     "google/gemma-scope-2b-pt-res", "layer_12/width_1m/average_l0_107"),
    ("gemma-scope-2b-pt-mlp-canonical", "layer_0/width_65k/canonical",
     "google/gemma-scope-2b-pt-mlp", "layer_0/width_65k/average_l0_72"),
    ("gemma-scope-2b-pt-att-canonical", "layer_25/width_16k/canonical",
     "google/gemma-scope-2b-pt-att", "layer_25/width_16k/average_l0_77"),
    ("gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71",
     "google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71"),
    ("gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6",
     "google/gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6"),
    ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre"),
    ("llama_scope_lxm_32x", "l15m_32x", "fnlp/Llama3_1-8B-Base-LXM-32x", "Llama3_1-8B-Base-L15M-32x"),
    ("pythia-70m-deduped-res-sm", "blocks.0.hook_resid_pre", "ctigges/pythia-70m-deduped__res-sm_processed", "e-res-sm"),
    ("pythia-70m-deduped-att-sm", "blocks.3.hook_attn_out", "ctigges/pythia-70m-deduped__att-sm_processed", "3-att-sm"),
]


@pytest.mark.parametrize(("release", "sae_id", "repo_id", "path"), RESOLVED)
def test_resolves_to_repo_and_path(directory, release, sae_id, repo_id, path) -> None:
    assert resolve_release(release, sae_id) == (repo_id, path)


def test_sae_lens_directory_is_used_when_installed() -> None:
    release, sae_id = "gemma-scope-9b-pt-res-canonical", "layer_20/width_16k/canonical"
    lookup = _sae_lens_directory()[release]
    assert release not in TABLE
    assert resolve_release(release, sae_id) == (lookup.repo_id, lookup.saes_map[sae_id])


def test_without_sae_lens_other_releases_point_to_it(without_sae_lens) -> None:
    with pytest.raises(ValueError, match=r"gemma-scope-9b-pt-res-canonical.*pip install sae-lens"):
        resolve_release("gemma-scope-9b-pt-res-canonical", "layer_20/width_16k/canonical")


# ------------------------------------------------------------------------------------------- errors


def test_unknown_release_names_it_and_close_matches(directory) -> None:
    with pytest.raises(ValueError, match=r"'gemma-scope-2b-pt-res-canonicl'.*Close matches: \['gemma-scope-2b-pt-res-canonical'"):
        resolve_release("gemma-scope-2b-pt-res-canonicl", "layer_20/width_16k/canonical")


def test_unknown_release_with_no_close_match_lists_known_releases(directory) -> None:
    with pytest.raises(ValueError, match=r"'zzz'.*Known: \['") as err:
        resolve_release("zzz", "x")
    if directory == "table":  # all of them: the table is small
        assert all(repr(release) in str(err.value) for release in TABLE)


@pytest.mark.parametrize(
    ("release", "sae_id", "close"),
    [
        ("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonicl", "layer_20/width_16k/canonical"),
        ("gemma-scope-2b-pt-res-canonical", "layer_20/width_1m/canonical", "layer_19/width_1m/canonical"),
        ("gpt2-small-res-jb", "blocks.8.hook_resid_post", "blocks.8.hook_resid_pre"),
        ("llama_scope_lxr_8x", "l32r_8x", "l2r_8x"),
    ],
)
def test_unknown_id_names_release_id_and_close_matches(directory, release, sae_id, close) -> None:
    with pytest.raises(ValueError, match=rf"{release!r}.*{sae_id!r}.*Close matches: \[.*{close!r}") as err:
        resolve_release(release, sae_id)
    source = "in SAELens's directory" if directory == "sae_lens" else "in sae_compile's table"
    assert source in str(err.value)


@pytest.mark.parametrize("sae_id", ["layer_26/width_16k/average_l0_71", "layer_20/width_1m/average_l0_71",
                                    "layer_20/width_16k/canonical", "embedding/width_4k/average_l0_6"])
def test_table_folder_release_checks_the_form(without_sae_lens, sae_id) -> None:
    release = "gemma-scope-2b-pt-mlp"  # no width_1m, no embedding SAEs, layers 0..25
    with pytest.raises(ValueError, match=rf"{release!r}.*{sae_id!r}.*folders matching"):
        resolve_release(release, sae_id)


# ------------------------------------------------------------------------------------- saelens://


def test_parse_release_uri() -> None:
    assert parse_release_uri("saelens://gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical") == (
        "gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert parse_release_uri("saelens://gpt2-small-res-jb/blocks.8.hook_resid_pre") == (
        "gpt2-small-res-jb", "blocks.8.hook_resid_pre")


@pytest.mark.parametrize("uri", ["saelens://", "saelens://gpt2-small-res-jb", "saelens://gpt2-small-res-jb/", "saelens:///x"])
def test_a_malformed_release_uri_says_what_it_expects(uri) -> None:
    with pytest.raises(ValueError, match=r"expected saelens://RELEASE/SAE_ID"):
        SAE.load(uri)


def test_cli_help_documents_the_three_spellings(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a local folder or file" in help_text and "hf://OWNER/NAME" in help_text and "saelens://RELEASE/SAE_ID" in help_text


def test_importing_sae_compile_does_not_import_sae_lens() -> None:
    code = "import sys, sae_compile; assert 'sae_lens' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------------------- end to end

_CANONICAL = ("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")


@pytest.fixture
def gemma_cache(tmp_path) -> Path:
    """An offline cache of google/gemma-scope-2b-pt-res with the canonical layer-20 folder and a
    neighbour, so that loading shows which one the name picked."""
    files = {
        "layer_20/width_16k/average_l0_71/params.npz": _npz_bytes(tmp_path),
        "layer_20/width_16k/average_l0_20/params.npz": b"not this one",
    }
    write_hub_cache(tmp_path / "c", "google/gemma-scope-2b-pt-res", files, COMMIT)
    return tmp_path / "c"


def test_from_release_loads_from_the_offline_cache(directory, offline, fetched, gemma_cache, tmp_path) -> None:
    sae = SAE.from_release(*_CANONICAL, cache_dir=gemma_cache)
    assert fetched == ["layer_20/width_16k/average_l0_71/params.npz"]
    assert sae.hook_name == "blocks.20.hook_resid_post"
    assert_same_sae(sae, SAE.load(tmp_path / "params.npz", hook_name="blocks.20.hook_resid_post"))


def test_release_uri_loads_through_from_release(directory, offline, gemma_cache, monkeypatch) -> None:
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(gemma_cache))
    by_name = SAE.from_release(*_CANONICAL)
    assert_same_sae(SAE.load("saelens://" + "/".join(_CANONICAL)), by_name)
    assert SAE.load("saelens://" + "/".join(_CANONICAL), layer=3).hook_name == "blocks.3.hook_resid_post"


def test_from_release_unknown_id_fails_before_any_download(directory, offline, fetched, gemma_cache) -> None:
    with pytest.raises(ValueError, match=r"no SAE id 'layer_20/width_16k/canonicl'"):
        SAE.from_release(_CANONICAL[0], "layer_20/width_16k/canonicl", cache_dir=gemma_cache)
    assert fetched == []
