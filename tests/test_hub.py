"""SAEs from the Hugging Face Hub through the real ``huggingface_hub`` code path, with no network.

Offline: the tests build the Hub cache layout on disk (``models--OWNER--NAME/refs/<revision>``,
``snapshots/<commit>/...`` linking to ``blobs/``) in a temporary ``cache_dir`` and load with
``HF_HUB_OFFLINE=1``. Online: a small Hub on loopback serves the folder-listing API and file
downloads, so ``hf_hub_download`` really downloads. Both check that only the files of the one SAE
asked for are fetched, although the repository holds other SAEs and large unrelated files.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_compile import SAE
from sae_compile.hub import parse_hf_uri
from tests.factories import random_sae
from tests.test_checkpoints import (
    _dl_state,
    _gemma_scope_params,
    _write_dictionary_learning,
    _write_gemma_scope,
    assert_same_sae,
)
from tests.test_goodfire import RELEASE_NAME, write_goodfire

hf = pytest.importorskip("huggingface_hub")
pytest.importorskip("huggingface_hub.constants")  # a lazily loaded submodule, patched below

REPO = "acme/saes"
COMMIT = "1" * 40
COMMIT_V1 = "2" * 40
BIG = 4 << 20  # bytes of each unrelated large file in the repository

# path_in_repo -> the files that SAE needs, weights first
NEEDED = {
    "saelens/layer_3": ["saelens/layer_3/sae_weights.safetensors", "saelens/layer_3/cfg.json"],
    "layer_4/width_16k/average_l0_71": ["layer_4/width_16k/average_l0_71/params.npz"],
    "layer_4/width_16k/average_l0_71/params.npz": ["layer_4/width_16k/average_l0_71/params.npz"],
    "layers.0": ["layers.0/sae.safetensors", "layers.0/cfg.json"],
    "dl/trainer_0": ["dl/trainer_0/ae.pt", "dl/trainer_0/config.json"],
    "dl/trainer_0/ae.pt": ["dl/trainer_0/ae.pt", "dl/trainer_0/config.json"],
    "goodfire": [f"goodfire/{RELEASE_NAME}"],
    f"goodfire/{RELEASE_NAME}": [f"goodfire/{RELEASE_NAME}"],
}


def _write_sparsify(folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": 16, "num_latents": 64, "k": 8}))
    g = torch.Generator().manual_seed(3)
    save_file({"encoder.weight": torch.randn(64, 16, generator=g), "encoder.bias": torch.randn(64, generator=g),
               "W_dec": torch.randn(64, 16, generator=g), "b_dec": torch.randn(16, generator=g)},
              folder / "sae.safetensors")


def _source_repo(root: Path, seed: int = 0) -> Path:
    """A repository's files on disk: five SAEs in five formats, plus files no SAE needs."""
    random_sae(16, 64, "jumprelu", seed=seed, apply_b_dec_to_input=True, hook_name="blocks.3.hook_resid_pre").save(
        root / "saelens/layer_3")
    random_sae(16, 64, "topk", seed=seed + 1, hook_name="blocks.5.hook_resid_post").save(root / "saelens/layer_5")
    _write_gemma_scope(root / "layer_4/width_16k/average_l0_71/params.npz", _gemma_scope_params(seed))
    _write_sparsify(root / "layers.0")
    _write_dictionary_learning(root / "dl/trainer_0", "AutoEncoder", _dl_state("AutoEncoder", seed))
    write_goodfire(root / "goodfire" / RELEASE_NAME)
    (root / "goodfire/README.md").write_text("model card")
    (root / "saelens/layer_3/optimizer.bin").write_bytes(b"\0" * BIG)
    (root / "dl/trainer_0/eval_results.json").write_text("{}")
    (root / "layer_4/width_16k/average_l0_71/activations.npy").write_bytes(b"\0" * BIG)
    (root / "README.md").write_text("SAEs")
    (root / "broken").mkdir()
    (root / "broken/sae_weights.safetensors").write_bytes((root / "saelens/layer_3/sae_weights.safetensors").read_bytes())
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main") -> None:
    """The Hugging Face cache layout for one revision: blobs by hash, snapshot links, a ref."""
    storage = cache_dir / ("models--" + repo_id.replace("/", "--"))
    for name, content in files.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)


@pytest.fixture
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def fetched(monkeypatch) -> list[str]:
    """The file names passed to the real ``hf_hub_download``, in order."""
    names: list[str] = []
    real = hf.hf_hub_download

    def recording(repo_id, filename, **kwargs):
        names.append(filename)
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(hf, "hf_hub_download", recording)
    return names


@pytest.fixture
def source(tmp_path) -> Path:
    return _source_repo(tmp_path / "source")


@pytest.fixture
def cache(tmp_path, source) -> Path:
    cache_dir = tmp_path / "hf_cache"
    write_hub_cache(cache_dir, REPO, _files(source), COMMIT)
    write_hub_cache(cache_dir, REPO, _files(_source_repo(tmp_path / "source_v1", seed=10)), COMMIT_V1, ref="v1")
    return cache_dir


# ------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("path_in_repo", list(NEEDED))
def test_offline_load_fetches_only_the_needed_files(offline, fetched, cache, source, path_in_repo) -> None:
    sae = SAE.from_pretrained(REPO, path_in_repo, cache_dir=cache)
    assert fetched == NEEDED[path_in_repo]
    local = SAE.load(source / path_in_repo)
    assert_same_sae(sae, local)


def test_offline_saelens_sae_equals_what_save_wrote(offline, cache) -> None:
    saved = random_sae(16, 64, "jumprelu", seed=0, apply_b_dec_to_input=True, hook_name="blocks.3.hook_resid_pre")
    assert_same_sae(SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=cache), saved)


def test_offline_load_options_apply(offline, cache) -> None:
    sae = SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=cache, dtype=torch.float64, layer=7)
    assert sae.dtype == torch.float64 and sae.hook_name == "blocks.7.hook_resid_pre"


def test_gemma_scope_site_comes_from_the_repo_path(offline, tmp_path) -> None:
    files = {"layer_20/width_16k/average_l0_71/params.npz": _npz_bytes(tmp_path)}
    write_hub_cache(tmp_path / "c", "google/gemma-scope-2b-pt-mlp", files, COMMIT)
    sae = SAE.from_pretrained("google/gemma-scope-2b-pt-mlp", "layer_20/width_16k/average_l0_71", cache_dir=tmp_path / "c")
    assert sae.hook_name == "blocks.20.hook_mlp_out"


def _npz_bytes(tmp_path: Path) -> bytes:
    file = tmp_path / "params.npz"
    np.savez(file, **_gemma_scope_params())
    return file.read_bytes()


def test_goodfire_repo_root_loads_its_pth(offline, fetched, tmp_path) -> None:
    files = {RELEASE_NAME: write_goodfire(tmp_path / RELEASE_NAME).read_bytes(), "README.md": b"card",
             ".gitattributes": b"*.pth filter=lfs"}
    write_hub_cache(tmp_path / "c", "Goodfire/Llama-3.1-8B-Instruct-SAE-l19", files, COMMIT)
    sae = SAE.from_pretrained("Goodfire/Llama-3.1-8B-Instruct-SAE-l19", cache_dir=tmp_path / "c")
    assert fetched == [RELEASE_NAME]
    assert sae.hook_name == "blocks.19.hook_resid_post"
    assert_same_sae(sae, SAE.load(tmp_path / RELEASE_NAME))


def test_revision_picks_the_snapshot(offline, cache, tmp_path) -> None:
    v1 = SAE.load(tmp_path / "source_v1/saelens/layer_3")
    assert_same_sae(SAE.from_pretrained(REPO, "saelens/layer_3", revision="v1", cache_dir=cache), v1)
    assert_same_sae(SAE.from_pretrained(REPO, "saelens/layer_3", revision=COMMIT_V1, cache_dir=cache), v1)
    main = SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=cache)
    assert not torch.equal(main.W_enc, v1.W_enc)


def test_default_cache_is_the_hugging_face_cache(offline, cache, source, monkeypatch) -> None:
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    assert_same_sae(SAE.from_pretrained(REPO, "layers.0"), SAE.load(source / "layers.0"))


# --------------------------------------------------------------------------------------------- hf://


def test_hf_uri_loads_through_from_pretrained(offline, cache, source, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    assert_same_sae(SAE.load(f"hf://{REPO}/saelens/layer_3"), SAE.load(source / "saelens/layer_3"))
    assert_same_sae(SAE.load(f"hf://{REPO}@v1/saelens/layer_3"), SAE.load(tmp_path / "source_v1/saelens/layer_3"))
    assert SAE.load(f"hf://{REPO}/saelens/layer_3", layer=1).hook_name == "blocks.1.hook_resid_pre"


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71",
         ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", None)),
        ("hf://owner/name", ("owner/name", None, None)),
        ("hf://owner/name@v1.0/a.pth", ("owner/name", "a.pth", "v1.0")),
        ("hf://owner/name/", ("owner/name", None, None)),
    ],
)
def test_parse_hf_uri(uri, parsed) -> None:
    assert parse_hf_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["hf://", "hf://owner", "hf:///name"])
def test_a_malformed_hf_uri_says_what_it_expects(uri) -> None:
    with pytest.raises(ValueError, match="hf://OWNER/NAME"):
        SAE.load(uri)


# ------------------------------------------------------------------------------------------- errors


def _assert_names(err: pytest.ExceptionInfo[ValueError], *parts: str) -> None:
    for part in parts:
        assert part in str(err.value), f"message does not name {part!r}: {err.value}"


OFFLINE_ERRORS = [
    # (case, repo, path, revision, what the message must name besides repo and path)
    ("repo not cached", "acme/nothing", "saelens/layer_3", None, "HF_HUB_OFFLINE"),
    ("revision not cached", REPO, "saelens/layer_3", "v9", "'v9'"),
    ("no such folder", REPO, "saelens/layer_9", None, "'layer_9'"),
    ("no such parent", REPO, "nowhere/layer_9", None, "'nowhere'"),
    ("no checkpoint in the folder", REPO, "saelens", None, "layer_3"),
    ("missing config", REPO, "broken", None, "cfg.json"),
]


@pytest.mark.parametrize(("repo", "path", "revision", "what"), [c[1:] for c in OFFLINE_ERRORS],
                         ids=[c[0] for c in OFFLINE_ERRORS])
def test_offline_errors_name_repo_path_and_what_is_missing(offline, fetched, cache, repo, path, revision, what) -> None:
    with pytest.raises(ValueError) as err:
        SAE.from_pretrained(repo, path, revision=revision, cache_dir=cache)
    _assert_names(err, repr(repo), repr(path), what)
    assert fetched == []  # decided from the listing, before any download


def test_bad_arguments_are_rejected_before_any_download(offline, fetched, cache) -> None:
    with pytest.raises(TypeError, match="repo_id"):
        SAE.from_pretrained(None)
    with pytest.raises(ValueError, match="plain folder or file path"):
        SAE.from_pretrained(REPO, "saelens/../..", cache_dir=cache)
    with pytest.raises(TypeError, match="layer"):
        SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=cache, layer="3")
    assert fetched == []


def test_without_huggingface_hub_the_error_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r'pip install "sae-compile\[hub\]"'):
        SAE.from_pretrained(REPO, "saelens/layer_3")


def test_importing_sae_compile_does_not_import_huggingface_hub() -> None:
    code = "import sys, sae_compile; assert 'huggingface_hub' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


# --------------------------------------------------------------------------- online, Hub on loopback


class _LoopbackHub(http.server.BaseHTTPRequestHandler):
    """The two Hub endpoints the loader uses: a folder's tree listing and file resolve (HEAD/GET)."""

    repos: dict[str, dict[str, dict[str, bytes]]]  # repo id -> revision -> files
    downloads: list[str]

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def _serve(self, body: bool) -> None:
        parts = [urllib.parse.unquote(p) for p in urllib.parse.urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and parts[4:5] == ["tree"]:
            self._tree("/".join(parts[2:4]), parts[5], "/".join(parts[6:]))
        elif parts[2:3] == ["resolve"]:
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self._error("EntryNotFound")

    def _files(self, repo_id: str, revision: str) -> dict[str, bytes] | None:
        if repo_id not in self.repos:
            return self._error("RepoNotFound")
        if revision not in self.repos[repo_id]:
            return self._error("RevisionNotFound")
        return self.repos[repo_id][revision]

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        files = self._files(repo_id, revision)
        if files is None:
            return
        prefix = f"{folder}/" if folder else ""
        children = {name[len(prefix):].split("/")[0] for name in files if name.startswith(prefix)}
        if not children:
            return self._error("EntryNotFound")
        entries = [
            {"type": "file", "path": prefix + c, "oid": "0" * 40, "size": len(files[prefix + c])}
            if prefix + c in files else {"type": "directory", "path": prefix + c, "oid": "0" * 40, "size": 0}
            for c in sorted(children)
        ]
        self._reply(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        files = self._files(repo_id, revision)
        if files is None:
            return
        if name not in files:
            return self._error("EntryNotFound")
        if body:
            self.downloads.append(name)
        etag = f'"{hashlib.sha256(files[name]).hexdigest()}"'
        headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Type": "application/octet-stream"}
        self._reply(200, files[name] if body else b"", headers, length=len(files[name]))

    def _error(self, code: str) -> None:
        self._reply(404, b"{}", {"X-Error-Code": code, "Content-Type": "application/json"})

    def _reply(self, status: int, data: bytes, headers: dict[str, str], length: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def loopback_hub(source, monkeypatch) -> Iterator[type[_LoopbackHub]]:
    handler = type("Hub", (_LoopbackHub,), {"repos": {REPO: {"main": _files(source)}}, "downloads": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(hf.constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    try:
        if hf.HfApi().endpoint != endpoint:
            pytest.skip("this huggingface_hub copies HF_ENDPOINT at import, so it cannot be pointed at loopback here")
        yield handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path_in_repo", ["saelens/layer_3", "dl/trainer_0/ae.pt", "goodfire"])
def test_online_download_fetches_only_the_needed_files(loopback_hub, fetched, source, tmp_path, path_in_repo) -> None:
    sae = SAE.from_pretrained(REPO, path_in_repo, cache_dir=tmp_path / "c")
    assert fetched == NEEDED[path_in_repo]
    assert sorted(loopback_hub.downloads) == sorted(NEEDED[path_in_repo])  # what went over the wire
    assert_same_sae(sae, SAE.load(source / path_in_repo))


def test_what_was_downloaded_online_loads_offline(loopback_hub, source, tmp_path, monkeypatch) -> None:
    SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=tmp_path / "c")
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", True)
    assert_same_sae(SAE.from_pretrained(REPO, "saelens/layer_3", cache_dir=tmp_path / "c"),
                    SAE.load(source / "saelens/layer_3"))


ONLINE_ERRORS = [
    ("no such repo", "acme/nothing", "saelens/layer_3", None, "no such model repository"),
    ("no such revision", REPO, "saelens/layer_3", "v9", "'v9'"),
    ("no such parent folder", REPO, "nowhere/layer_9", None, "'nowhere'"),
    ("no such folder", REPO, "saelens/layer_9", None, "'layer_9'"),
    ("no checkpoint in the folder", REPO, "saelens", None, "layer_3"),
    ("missing config", REPO, "broken", None, "cfg.json"),
]


@pytest.mark.parametrize(("repo", "path", "revision", "what"), [c[1:] for c in ONLINE_ERRORS],
                         ids=[c[0] for c in ONLINE_ERRORS])
def test_online_errors_name_repo_path_and_what_is_missing(loopback_hub, tmp_path, repo, path, revision, what) -> None:
    with pytest.raises(ValueError) as err:
        SAE.from_pretrained(repo, path, revision=revision, cache_dir=tmp_path / "c")
    _assert_names(err, repr(repo), repr(path), what)
    assert loopback_hub.downloads == []
