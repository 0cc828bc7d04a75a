"""SAE checkpoints (DESIGN §6): each public format read without its library, checked against it.

Where the source library installs here (``sae-lens``, ``eai-sparsify``; test-only extras), the
files are written by the library itself and our encode/decode must match the library's own to
1e-6 in fp32; those tests skip cleanly without it. Gemma Scope and dictionary_learning have no
installable library, so the tests write their files with the real key layouts and compare with
their published encode/decode transcribed below.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_compile import SAE
from sae_compile.checkpoints import Checkpoint, detect_format, read_checkpoint, save_sae
from sae_compile.sae import load_sae
from tests.factories import random_sae

D_IN, D_SAE, K = 16, 64, 8
TOL = {"rtol": 1e-6, "atol": 1e-6}
REPO = Path(__file__).resolve().parent.parent


def _x(seed: int = 0, n: int = 20) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))  # [n, d_in]


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_same_sae(a: SAE, b: SAE) -> None:
    """Bit-exact equality of every constructor argument."""
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    for name in ("activation", "k", "apply_b_dec_to_input", "hook_name"):
        assert getattr(a, name) == getattr(b, name), name


def assert_names(err: pytest.ExceptionInfo[ValueError], file: Path, key: str) -> None:
    msg = str(err.value)
    assert str(file) in msg, f"message does not name {file}: {msg}"
    assert key in msg, f"message does not name {key!r}: {msg}"


# ------------------------------------------------------------------------------------- SAELens


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens")


def _saelens_sae(sae_lens, architecture: str, apply_b_dec: bool, hook_name: str):
    """A SAELens SAE of ``architecture`` with every parameter random (biases and thresholds too)."""
    from sae_lens.saes.sae import SAEMetadata

    config_class = {
        "standard": sae_lens.StandardSAEConfig, "jumprelu": sae_lens.JumpReLUSAEConfig, "topk": sae_lens.TopKSAEConfig,
    }[architecture]
    extra = {"k": K} if architecture == "topk" else {}
    cfg = config_class(
        d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=apply_b_dec, metadata=SAEMetadata(hook_name=hook_name), **extra
    )
    sae = sae_lens.SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(sae.named_parameters())):
            p.copy_(torch.rand(p.shape) * 0.5 if name == "threshold" else _randn(*p.shape, seed=i, scale=0.5))
    return sae


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_directory_matches_saelens_encode_decode(sae_lens, tmp_path, architecture, apply_b_dec) -> None:
    ref = _saelens_sae(sae_lens, architecture, apply_b_dec, "blocks.3.hook_resid_pre")
    ref.save_model(tmp_path)
    sae = load_sae(tmp_path)
    x = _x()
    with torch.no_grad():
        f_ref = ref.encode(x)
        torch.testing.assert_close(sae.encode(x), f_ref, **TOL)
        torch.testing.assert_close(sae.decode(f_ref), ref.decode(f_ref), **TOL)
    assert sae.activation == {"standard": "relu"}.get(architecture, architecture)
    assert sae.apply_b_dec_to_input is apply_b_dec
    assert sae.k == (K if architecture == "topk" else None)


def test_saelens_hook_name_comes_from_metadata(sae_lens, tmp_path) -> None:
    # The acceptance case: steer(model, [sae]) places this SAE on resid_pre of layer 3.
    _saelens_sae(sae_lens, "standard", True, "blocks.3.hook_resid_pre").save_model(tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.3.hook_resid_pre"
    assert load_sae(tmp_path).hook_name == "blocks.3.hook_resid_pre"


def test_saelens_sae_lands_on_its_hook_and_steers_like_the_reference(sae_lens, tmp_path) -> None:
    import sae_compile as sc
    from tests.factories import assert_rel_close, rel_err
    from tests.models import make_model
    from tests.reference import reference_logits

    _saelens_sae(sae_lens, "jumprelu", True, "blocks.3.hook_resid_pre").save_model(tmp_path)
    sae = load_sae(tmp_path)
    model = make_model("llama", hidden=D_IN, num_layers=4)
    steered = sc.steer(model, [sae], backend="aot_eager")
    assert steered.attached_sites == ("blocks.3.hook_resid_pre",)
    steering = sc.Steering(sc.Clamp(sae.hook_name, 5, 4.0), sc.Clamp(sae.hook_name, 9, 0.0, "scale"))
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = steered(ids, steering=steering).logits
    expected = reference_logits(model, ids, saes={sae.hook_name: sae}, steering=steering)
    assert rel_err(expected, reference_logits(model, ids)) > 1e-3
    assert_rel_close(got, expected, 1e-5)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_saelens_reads_what_save_sae_writes(sae_lens, tmp_path, activation) -> None:
    ours = random_sae(D_IN, D_SAE, activation, seed=2, apply_b_dec_to_input=True, hook_name="blocks.1.hook_mlp_out")
    save_sae(ours, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = _x(1)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), **TOL)
        torch.testing.assert_close(theirs.decode(ours.encode(x)), ours.decode(ours.encode(x)), **TOL)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_mlp_out"
    assert theirs.cfg.apply_b_dec_to_input is True


def _write_saelens(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A SAELens folder written by hand, for configs the installed SAELens would not write."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def _saelens_tensors(seed: int = 0, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "W_enc": _randn(D_IN, D_SAE, seed=seed, scale=0.3), "W_dec": _randn(D_SAE, D_IN, seed=seed + 1, scale=0.3),
        "b_enc": _randn(D_SAE, seed=seed + 2, scale=0.1), "b_dec": _randn(D_IN, seed=seed + 3, scale=0.1), **extra,
    }


def test_pre_6_saelens_config_keeps_hook_point_and_defaults_to_b_dec_subtraction(tmp_path) -> None:
    # Pre-6.0 SAELens: no architecture, hook_point instead of hook_name, no apply_b_dec_to_input
    # (SAELens defaults it to True), normalize_activations as a bool.
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.5.hook_resid_pre", "normalize_activations": False}
    sae = load_sae(_write_saelens(tmp_path, cfg, _saelens_tensors()))
    assert (sae.activation, sae.apply_b_dec_to_input, sae.hook_name) == ("relu", True, "blocks.5.hook_resid_pre")


def test_pre_6_saelens_topk_reads_k_from_activation_fn_kwargs(tmp_path) -> None:
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "activation_fn": "topk", "activation_fn_kwargs": {"k": 5}, "hook_name": "h"}
    sae = load_sae(_write_saelens(tmp_path, cfg, _saelens_tensors()))
    assert (sae.activation, sae.k) == ("topk", 5)


def test_saelens_log_threshold_is_exponentiated(tmp_path) -> None:
    log_threshold = _randn(D_SAE, seed=9, scale=0.5)
    cfg = {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE}
    sae = load_sae(_write_saelens(tmp_path, cfg, _saelens_tensors(log_threshold=log_threshold)))
    torch.testing.assert_close(sae.threshold, log_threshold.exp(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- Gemma Scope


def _gemma_scope_params(seed: int = 0) -> dict[str, np.ndarray]:
    """Gemma Scope's params.npz keys and shapes; some thresholds negative to pin their meaning."""
    threshold = _randn(D_SAE, seed=seed + 4, scale=0.3)
    return {k: v.numpy() for k, v in {**_saelens_tensors(seed), "threshold": threshold}.items()}


def _write_gemma_scope(file: Path, params: dict[str, np.ndarray], lowercase: bool = False) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    if lowercase:  # Gemma Scope 2 spells the matrices w_enc / w_dec
        params = {k.replace("W_", "w_"): v for k, v in params.items()}
    if file.suffix == ".npz":
        np.savez(file, **params)
    else:
        save_file({k: torch.from_numpy(v) for k, v in params.items()}, file)
    return file


def gemma_scope_reference(p: dict[str, np.ndarray], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gemma Scope tutorial's JumpReLUSAE: mask = pre > θ; acts = mask * relu(pre)."""
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * torch.relu(pre)
    return acts, acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("name", ["params.npz", "params.safetensors"])
def test_gemma_scope_matches_its_jumprelu(tmp_path, name) -> None:
    params = _gemma_scope_params()
    file = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82" / name, params)
    sae = load_sae(file.parent)
    f_ref, x_hat_ref = gemma_scope_reference(params, _x())
    torch.testing.assert_close(sae.encode(_x()), f_ref, **TOL)
    torch.testing.assert_close(sae.decode(sae.encode(_x())), x_hat_ref, **TOL)
    assert (sae.activation, sae.apply_b_dec_to_input, sae.hook_name) == ("jumprelu", False, "blocks.12.hook_resid_post")


@pytest.mark.parametrize(
    ("relative", "hook_name"),
    [
        ("layer_12/width_16k/average_l0_82/params.npz", "blocks.12.hook_resid_post"),
        ("models--google--gemma-scope-2b-pt-mlp/snapshots/abc/layer_4/width_16k/average_l0_10/params.npz",
         "blocks.4.hook_mlp_out"),
        ("gemma-scope-9b-pt-att/layer_6/width_16k/average_l0_40/params.npz", "blocks.6.attn.hook_z"),
        ("gemma-scope-2-4b-pt/resid_post/layer_9_width_16k_l0_small/params.safetensors", "blocks.9.hook_resid_post"),
        ("gemma-scope-2-4b-pt/mlp_out_all/layer_2_width_65k_l0_big/params.safetensors", "blocks.2.hook_mlp_out"),
        ("my_sae/params.npz", None),
    ],
)
def test_gemma_scope_site_comes_from_the_path(tmp_path, relative, hook_name) -> None:
    file = _write_gemma_scope(tmp_path / relative, _gemma_scope_params(), lowercase="gemma-scope-2-" in relative)
    assert load_sae(file).hook_name == hook_name


def test_gemma_scope_layer_and_hook_name_overrides(tmp_path) -> None:
    file = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "params.npz", _gemma_scope_params())
    assert load_sae(file, layer=7).hook_name == "blocks.7.hook_mlp_out"
    assert load_sae(file, hook_name="blocks.1.hook_resid_pre").hook_name == "blocks.1.hook_resid_pre"
    no_layer = _write_gemma_scope(tmp_path / "plain" / "params.npz", _gemma_scope_params())
    assert load_sae(no_layer, layer=5).hook_name == "blocks.5.hook_resid_post"


def test_gemma_scope_keys_in_any_safetensors_file_are_detected(tmp_path) -> None:
    file = _write_gemma_scope(tmp_path / "layer_2" / "my_export.safetensors", _gemma_scope_params())
    assert detect_format(file) == ("gemma_scope", file)
    assert load_sae(file).hook_name == "blocks.2.hook_resid_post"


# ------------------------------------------------------------------------------------- sparsify


@pytest.fixture(scope="module")
def sparsify():
    return pytest.importorskip("sparsify")


def _sparsify_coder(sparsify, seed: int = 0, **cfg):
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=K, num_latents=D_SAE, **cfg))
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(coder.named_parameters())):
            p.copy_(_randn(*p.shape, seed=seed + i, scale=0.5))
    return coder


def test_sparsify_hookpoint_matches_sparsify_encode_decode(sparsify, tmp_path) -> None:
    coder = _sparsify_coder(sparsify)
    coder.save_to_disk(tmp_path / "layers.3")
    sae = load_sae(tmp_path / "layers.3")
    x = _x()
    with torch.no_grad():
        top = coder.encode(x)
        f_ref = torch.zeros(x.shape[0], D_SAE).scatter(-1, top.top_indices, top.top_acts)
        torch.testing.assert_close(sae.encode(x), f_ref, **TOL)
        torch.testing.assert_close(sae.decode(f_ref), coder.decode(top.top_acts, top.top_indices), **TOL)
    assert (sae.activation, sae.k, sae.apply_b_dec_to_input) == ("topk", K, True)
    assert sae.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    ("hookpoint", "hook_name"),
    [
        ("layers.3", "blocks.3.hook_resid_post"),
        ("layers.10.mlp", "blocks.10.hook_mlp_out"),
        ("layers.2.self_attn", "blocks.2.hook_attn_out"),
        ("model.layers.7", "blocks.7.hook_resid_post"),
        ("embed_tokens", None),
    ],
)
def test_sparsify_hookpoint_names_the_site(sparsify, tmp_path, hookpoint, hook_name) -> None:
    _sparsify_coder(sparsify).save_to_disk(tmp_path / hookpoint)
    assert load_sae(tmp_path / hookpoint).hook_name == hook_name


def test_sparsify_transcoder_is_rejected(sparsify, tmp_path) -> None:
    _sparsify_coder(sparsify, transcode=True).save_to_disk(tmp_path / "layers.1.mlp")
    with pytest.raises(ValueError) as err:
        load_sae(tmp_path / "layers.1.mlp")
    assert_names(err, tmp_path / "layers.1.mlp" / "cfg.json", "transcode")


# -------------------------------------------------------------------------- dictionary_learning


def _dl_state(dict_class: str, seed: int = 0, threshold: float = 0.3) -> dict[str, torch.Tensor]:
    """ae.pt state dicts with dictionary_learning's key names and nn.Linear layouts."""
    r = lambda *shape, s: _randn(*shape, seed=seed + s, scale=0.4)  # noqa: E731
    linear = {
        "encoder.weight": r(D_SAE, D_IN, s=0), "encoder.bias": r(D_SAE, s=1), "decoder.weight": r(D_IN, D_SAE, s=2),
    }
    params = {"W_enc": r(D_IN, D_SAE, s=0), "b_enc": r(D_SAE, s=1), "W_dec": r(D_SAE, D_IN, s=2), "b_dec": r(D_IN, s=3)}
    k, scalar = torch.tensor(K, dtype=torch.int), torch.tensor(threshold)
    return {
        "AutoEncoder": {**linear, "bias": r(D_IN, s=3)},
        "AutoEncoderTopK": {**linear, "b_dec": r(D_IN, s=3), "k": k, "threshold": scalar},
        "BatchTopKSAE": {**linear, "b_dec": r(D_IN, s=3), "k": k, "threshold": scalar},
        "MatryoshkaBatchTopKSAE": {**params, "k": k, "threshold": scalar, "group_sizes": torch.tensor([16, 48])},
        "JumpReluAutoEncoder": {**params, "threshold": r(D_SAE, s=4)},
    }[dict_class]


def _write_dictionary_learning(folder: Path, dict_class: str, state: dict, **trainer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ae.pt")
    trainer = {
        "dict_class": dict_class, "trainer_class": "Trainer", "activation_dim": D_IN, "dict_size": D_SAE,
        "layer": 3, "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3",
        **({"k": K} if "TopK" in dict_class else {}), **trainer,
    }
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


def dictionary_learning_reference(dict_class: str, s: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """encode/decode of dictionary_learning's classes (dictionary.py, trainers/*.py), inference defaults."""
    lin = torch.nn.functional.linear
    if dict_class == "AutoEncoder":
        f = torch.relu(lin(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
        return f, lin(f, s["decoder.weight"]) + s["bias"]
    if dict_class == "AutoEncoderTopK":
        post = torch.relu(lin(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        top = post.topk(int(s["k"]), sorted=False, dim=-1)
        f = torch.zeros_like(post).scatter_(-1, top.indices, top.values)
        return f, lin(f, s["decoder.weight"]) + s["b_dec"]
    if dict_class == "BatchTopKSAE":  # encode(use_threshold=True)
        post = torch.relu(lin(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        f = post * (post > s["threshold"])
        return f, lin(f, s["decoder.weight"]) + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    pre = x @ s["W_enc"] + s["b_enc"]  # JumpReluAutoEncoder, apply_b_dec_to_input=False
    f = torch.relu(pre * (pre > s["threshold"]))
    return f, f @ s["W_dec"] + s["b_dec"]


@pytest.mark.parametrize(
    ("dict_class", "threshold"),
    [
        ("AutoEncoder", 0.3), ("AutoEncoderTopK", 0.3), ("BatchTopKSAE", 0.3),
        ("BatchTopKSAE", -1.0),  # the value before training ever set it: plain relu
        ("MatryoshkaBatchTopKSAE", 0.3), ("JumpReluAutoEncoder", 0.3),
    ],
)
def test_dictionary_learning_matches_its_encode_decode(tmp_path, dict_class, threshold) -> None:
    state = _dl_state(dict_class, threshold=threshold)
    sae = load_sae(_write_dictionary_learning(tmp_path, dict_class, state))
    f_ref, x_hat_ref = dictionary_learning_reference(dict_class, state, _x())
    torch.testing.assert_close(sae.encode(_x()), f_ref, **TOL)
    torch.testing.assert_close(sae.decode(sae.encode(_x())), x_hat_ref, **TOL)
    assert sae.hook_name == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    ("trainer", "hook_name"),
    [
        ({"submodule_name": "mlp_out_layer_4", "layer": 4}, "blocks.4.hook_mlp_out"),
        ({"submodule_name": None, "layer": 2}, "blocks.2.hook_resid_post"),
        ({"submodule_name": "embed", "layer": 0}, None),
    ],
)
def test_dictionary_learning_site_comes_from_the_trainer_config(tmp_path, trainer, hook_name) -> None:
    folder = _write_dictionary_learning(tmp_path, "AutoEncoder", _dl_state("AutoEncoder"), **trainer)
    assert load_sae(folder).hook_name == hook_name


def test_dictionary_learning_ae_pt_is_read_without_running_pickles(tmp_path) -> None:
    marker = tmp_path / "pickle_ran"
    folder = _write_dictionary_learning(tmp_path / "dl", "AutoEncoder", _dl_state("AutoEncoder"))
    torch.save({**_dl_state("AutoEncoder"), "bias": _TouchOnUnpickle(marker)}, folder / "ae.pt")
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert not marker.exists(), "loading ae.pt ran the code pickled in it"
    assert "pickles objects other than tensors" in str(err.value)
    assert_names(err, folder / "ae.pt", "ae.pt")


class _TouchOnUnpickle:
    """Pickles as a call to ``Path.touch(marker)``: full unpickling creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_the_pickle_marker_is_created_by_full_unpickling(tmp_path) -> None:
    # Guards the test above: its marker would exist had the loader unpickled the file.
    marker = tmp_path / "pickle_ran"
    torch.save({"bias": _TouchOnUnpickle(marker)}, tmp_path / "ae.pt")
    torch.load(tmp_path / "ae.pt", weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------- round trip, options


def _every_format(tmp_path: Path) -> dict[str, Path]:
    return {
        "saelens": _write_saelens(
            tmp_path / "saelens",
            {"architecture": "jumprelu", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
             "metadata": {"hook_name": "blocks.3.hook_resid_pre"}},
            _saelens_tensors(threshold=torch.rand(D_SAE)),
        ),
        "gemma_scope": _write_gemma_scope(tmp_path / "layer_4" / "params.npz", _gemma_scope_params()),
        "dictionary_learning_topk": _write_dictionary_learning(
            tmp_path / "dl_topk", "AutoEncoderTopK", _dl_state("AutoEncoderTopK")),
        "dictionary_learning_batch_topk": _write_dictionary_learning(
            tmp_path / "dl_batch", "BatchTopKSAE", _dl_state("BatchTopKSAE")),
    }


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_save_load_is_exact(tmp_path, dtype) -> None:
    for name, path in _every_format(tmp_path).items():
        first = load_sae(path, dtype=dtype)
        save_sae(first, tmp_path / f"saved_{name}")
        assert_same_sae(load_sae(tmp_path / f"saved_{name}"), first)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_a_saved_sae_round_trips_exactly(tmp_path, activation) -> None:
    sae = random_sae(D_IN, D_SAE, activation, seed=4, apply_b_dec_to_input=activation == "topk")
    save_sae(sae, tmp_path)
    assert_same_sae(load_sae(tmp_path), sae)


def test_saving_over_the_loaded_checkpoint_keeps_both_intact(tmp_path) -> None:
    # The loaded SAE's tensors view the file's memory map; save_sae must not truncate it under them.
    save_sae(random_sae(D_IN, D_SAE, "relu", seed=5), tmp_path)
    loaded = load_sae(tmp_path)
    expected = loaded.W_enc.clone()
    save_sae(loaded.to(torch.float64), tmp_path)
    assert torch.equal(loaded.W_enc, expected)
    assert load_sae(tmp_path).dtype == torch.float64


def test_dtype_and_device_options(tmp_path) -> None:
    path = _every_format(tmp_path)["saelens"]
    stored = load_sae(path)
    wide = load_sae(path, dtype=torch.float64, device="cpu")
    assert wide.dtype == torch.float64 and wide.device == torch.device("cpu")
    assert torch.equal(wide.W_dec, stored.W_dec.double())
    assert stored.dtype == torch.float32


def test_transposed_layouts_load_as_views_not_copies(tmp_path) -> None:
    sae = load_sae(_write_dictionary_learning(tmp_path, "AutoEncoder", _dl_state("AutoEncoder")))
    assert not sae.W_enc.is_contiguous()  # encoder.weight.T, used in place


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_safetensors_weights_stay_memory_mapped(tmp_path) -> None:
    save_sae(random_sae(D_IN, D_SAE, "relu", seed=6), tmp_path)
    sae = load_sae(tmp_path)
    assert str(tmp_path / "sae_weights.safetensors") in Path("/proc/self/maps").read_text()
    assert sae.d_sae == D_SAE


@pytest.mark.cuda
def test_device_option_loads_onto_the_gpu(tmp_path) -> None:
    save_sae(random_sae(D_IN, D_SAE, "jumprelu", seed=7), tmp_path)
    sae = load_sae(tmp_path, device="cuda", dtype=torch.bfloat16)
    assert sae.device.type == "cuda" and sae.dtype == torch.bfloat16
    assert sae.threshold.device.type == "cuda"


def test_hook_name_and_layer_overrides(tmp_path) -> None:
    path = _every_format(tmp_path)["saelens"]
    assert load_sae(path, layer=9).hook_name == "blocks.9.hook_resid_pre"
    assert load_sae(path, hook_name="blocks.0.hook_mlp_out").hook_name == "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match="hook_name"):
        load_sae(path, hook_name="blocks.0.hook_mlp_out", layer=1)


def test_negative_thresholds_save_as_saelens_reads_them(sae_lens, tmp_path) -> None:
    # Both compute relu(pre) * (pre > threshold), so negative thresholds are saved as they are.
    sae = random_sae(D_IN, D_SAE, "jumprelu", seed=8)
    negative = SAE(sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec, activation="jumprelu", threshold=sae.threshold - 1,
                   hook_name="blocks.0.hook_resid_post")
    save_sae(negative, tmp_path)
    assert_same_sae(load_sae(tmp_path), negative)
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(tmp_path).encode(_x()), negative.encode(_x()), **TOL)


def test_a_checkpoint_saves_and_reads_back_without_an_sae(tmp_path) -> None:
    path = _every_format(tmp_path)["dictionary_learning_batch_topk"]
    checkpoint = read_checkpoint(path, layer=6)
    assert isinstance(checkpoint, Checkpoint) and checkpoint.hook_name == "blocks.6.hook_resid_post"
    save_sae(checkpoint, tmp_path / "saved")
    assert_same_sae(load_sae(tmp_path / "saved"), SAE(**checkpoint._asdict()))
    assert_same_sae(SAE.load(tmp_path / "saved"), load_sae(path, layer=6))


def test_save_sae_rejects_what_is_not_an_sae(tmp_path) -> None:
    with pytest.raises(TypeError, match="expected an sae_compile SAE"):
        save_sae({"W_enc": torch.zeros(2, 3)}, tmp_path)


def test_checkpoints_does_not_import_the_sae_module() -> None:
    # sae.py builds SAEs from checkpoints.py's Checkpoint; an import back would be a cycle.
    tree = ast.parse((REPO / "sae_compile" / "checkpoints.py").read_text())
    imported = [(node.level, node.module) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [(0, alias.name) for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for level, m in imported if level > 0 or (m or "").startswith("sae_compile")], imported


# --------------------------------------------------------------------------------------- errors


def _case_saelens(mutate_cfg: Callable[[dict], None] | None = None, **tensors: torch.Tensor | None):
    def build(tmp_path: Path) -> Path:
        cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE,
               "metadata": {"hook_name": "blocks.0.hook_resid_post"}}
        if mutate_cfg is not None:
            mutate_cfg(cfg)
        weights = {k: v for k, v in {**_saelens_tensors(), **tensors}.items() if v is not None}
        return _write_saelens(tmp_path / "sae", cfg, weights)
    return build


def _nan_matrix() -> torch.Tensor:
    w = _randn(D_SAE, D_IN, seed=0)
    w[3, 4] = float("nan")
    return w


def _gemma_without(key: str):
    def build(tmp_path: Path) -> Path:
        params = _gemma_scope_params()
        del params[key]
        return _write_gemma_scope(tmp_path / "layer_1" / "params.npz", params)
    return build


def _garbage(name: str):
    def build(tmp_path: Path) -> Path:
        folder = tmp_path / "sae"
        folder.mkdir()
        (folder / name).write_bytes(b"\x00not a real checkpoint\xff" * 4)
        if name == "sae_weights.safetensors":
            (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE}))
        if name == "ae.pt":
            trainer = {"dict_class": "AutoEncoder", "activation_dim": D_IN, "dict_size": D_SAE}
            (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
        return folder / name
    return build


def _sparsify_cfg(hookpoint: str = "layers.0", **cfg):
    def build(tmp_path: Path) -> Path:
        folder = tmp_path / hookpoint
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": K, **cfg}))
        save_file({"encoder.weight": _randn(D_SAE, D_IN, seed=0), "encoder.bias": torch.zeros(D_SAE),
                   "W_dec": _randn(D_SAE, D_IN, seed=1), "b_dec": torch.zeros(D_IN)}, folder / "sae.safetensors")
        return folder
    return build


def _dl_class(dict_class: str):
    def build(tmp_path: Path) -> Path:
        return _write_dictionary_learning(tmp_path / "dl", dict_class, _dl_state("AutoEncoder"))
    return build


def _unknown_folder(tmp_path: Path) -> Path:
    (tmp_path / "weights.bin").write_bytes(b"0")
    return tmp_path


# (case id, builder -> path to load, file the message must name (relative to tmp_path), key it must name)
MALFORMED = [
    ("unknown layout", _unknown_folder, ".", "weights.bin"),
    ("missing key", _case_saelens(b_enc=None), "sae/sae_weights.safetensors", "b_enc"),
    ("shape mismatch", _case_saelens(W_dec=_randn(D_IN, D_SAE, seed=0)), "sae/sae_weights.safetensors", "W_dec"),
    ("non-finite weights", _case_saelens(W_dec=_nan_matrix()), "sae/sae_weights.safetensors", "W_dec"),
    ("integer weights", _case_saelens(b_dec=torch.zeros(D_IN, dtype=torch.int32)), "sae/sae_weights.safetensors",
     "b_dec"),
    ("unsupported architecture", _case_saelens(lambda c: c.update(architecture="gated")), "sae/cfg.json",
     "architecture"),
    ("unsupported normalisation", _case_saelens(lambda c: c.update(normalize_activations="expected_average_only_in")),
     "sae/cfg.json", "normalize_activations"),
    ("missing cfg key", _case_saelens(lambda c: c.pop("d_sae")), "sae/cfg.json", "d_sae"),
    ("topk k out of range", _case_saelens(lambda c: c.update(architecture="topk", k=D_SAE + 1)), "sae/cfg.json", "'k'"),
    ("folding needed", _case_saelens(lambda c: c.update(architecture="topk", k=4, rescale_acts_by_decoder_norm=True)),
     "sae/cfg.json", "rescale_acts_by_decoder_norm"),
    ("scaling factor", _case_saelens(scaling_factor=torch.full((D_SAE,), 2.0)), "sae/sae_weights.safetensors",
     "scaling_factor"),
    ("corrupt safetensors", _garbage("sae_weights.safetensors"), "sae/sae_weights.safetensors", "sae_weights"),
    ("corrupt npz", _garbage("params.npz"), "sae/params.npz", "params.npz"),
    ("corrupt ae.pt", _garbage("ae.pt"), "sae/ae.pt", "ae.pt"),
    ("missing threshold", _gemma_without("threshold"), "layer_1/params.npz", "threshold"),
    ("sparsify groupmax", _sparsify_cfg(activation="groupmax"), "layers.0/cfg.json", "activation"),
    ("sparsify skip connection", _sparsify_cfg(skip_connection=True), "layers.0/cfg.json", "skip_connection"),
    ("sparsify k", _sparsify_cfg(k=0), "layers.0/cfg.json", "'k'"),
    ("dictionary_learning class", _dl_class("GatedAutoEncoder"), "dl/config.json", "dict_class"),
]


@pytest.mark.parametrize(("builder", "file", "key"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_checkpoints_raise_naming_file_and_key(tmp_path, builder, file, key) -> None:
    path = builder(tmp_path)
    with pytest.raises(ValueError) as err:
        load_sae(path)
    assert_names(err, (tmp_path / file).resolve() if file == "." else tmp_path / file, key)


def test_corrupt_cfg_json_names_the_file(tmp_path) -> None:
    folder = _case_saelens()(tmp_path)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError) as err:
        load_sae(folder)
    assert_names(err, folder / "cfg.json", "cfg.json")


def test_gemma_scope_transcoders_are_rejected(tmp_path) -> None:
    file = _write_gemma_scope(tmp_path / "gemma-scope-2b-pt-transcoders/layer_3/params.npz", _gemma_scope_params())
    with pytest.raises(ValueError) as err:
        load_sae(file)
    assert_names(err, file, "transcoder")


def test_a_folder_of_hookpoints_points_at_one_of_them(tmp_path) -> None:
    for hookpoint in ("layers.0", "layers.1"):
        _sparsify_cfg(hookpoint)(tmp_path)
    with pytest.raises(ValueError, match="pass one of those folders") as err:
        load_sae(tmp_path)
    assert_names(err, tmp_path, "layers.1/")
    assert load_sae(tmp_path / "layers.1").hook_name == "blocks.1.hook_resid_post"


# ------------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_large_load_adds_no_second_host_copy(tmp_path) -> None:
    # 16384 x 2048 fp32 (256 MiB of weights) keeps this affordable; the benchmark runs 65536 x 4096.
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_load_memory.py"), "--d-sae", "16384", "--d-in", "2048",
         "--out", str(out)], check=True, env=env, capture_output=True,
    )
    rows = json.loads(out.read_text())["rows"]
    assert rows["mmap_then_clone"]["x_weights"] > 1.8  # the measurement can see a second copy
    assert rows["readers_only"]["x_weights"] < 1.2
    assert rows["load_sae"]["x_weights"] < 1.2
