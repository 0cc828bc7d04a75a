"""Llama Scope (fnlp/Llama3_1-8B-Base-LX{R,A,M}-{8x,32x}): ``hyperparams.json`` + ``checkpoints/final.safetensors``.

Language-Model-SAEs, the release's library, is not installable at the release's version (its index
name ``lm-saes`` is now a shim for a renamed project), so the tests write the files by hand. The
layout is read from that library at the "Llama Scope SAEs" commit (OpenMOSS/Language-Model-SAEs
4ec6f0aa, ``src/lm_saes/sae.py`` and ``config.py``: ``save_hyperparameters`` dumps every
``SAEConfig`` field to ``hyperparams.json``, and ``from_config`` reads
``checkpoints/final.safetensors`` with nn.Linear ``encoder.weight [d_sae, d_model]``,
``encoder.bias``, ``decoder.weight [d_model, d_sae]``, ``decoder.bias``) and from SAELens's
``llama_scope`` loader, which reads the same two files. ``published`` below is that library's
``from_config`` (dataset-norm standardisation, unit decoder norms, TopK -> JumpReLU when a
threshold is set) followed by its ``encode`` and ``decode``, in fp64.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sae_compile as sc
from sae_compile import SAE
from sae_compile.checkpoints import checkpoint_files, detect_format
from tests import test_hub, test_releases
from tests.factories import assert_rel_close, rel_err
from tests.models import make_model
from tests.reference import reference_logits
from tests.test_checkpoints import assert_names, assert_same_sae
from tests.test_hub import COMMIT, hf, write_hub_cache

# tests/test_hub.py's and tests/test_releases.py's fixtures, used here by name.
offline = test_hub.offline
fetched = test_hub.fetched
directory = test_releases.directory
without_sae_lens = test_releases.without_sae_lens

D_MODEL, D_SAE = 16, 64
FP64 = dict(rtol=1e-12, atol=1e-12)


def hyperparams(**changes) -> dict:
    """A release's ``hyperparams.json`` (every SAEConfig field, as save_hyperparameters writes it),
    at a small shape; ``changes`` replace entries (``None`` removes one)."""
    cfg = {
        "hook_point_in": "blocks.15.hook_resid_post", "hook_point_out": "blocks.15.hook_resid_post",
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False, "expansion_factor": D_SAE // D_MODEL,
        "d_model": D_MODEL, "d_sae": D_SAE, "bias_init_method": "all_zero", "act_fn": "jumprelu",
        "jump_relu_threshold": 0.25, "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 6.3125, "out": 6.3125}, "decoder_exactly_fixed_norm": False,
        "sparsity_include_decoder_norm": True, "use_glu_encoder": False, "init_decoder_norm": 0.5,
        "init_encoder_norm": None, "init_encoder_with_decoder_transpose": True, "lp": 1, "l1_coefficient": 8e-05,
        "l1_coefficient_warmup_steps": 0.1, "top_k": 8, "k_warmup_steps": 0.1, "use_batch_norm_mse": True,
        "use_ghost_grads": False, "tp_size": 1, "ddp_size": 1,
    }
    return changed(cfg, changes)


def changed(entries: dict, changes: dict) -> dict:
    """``entries`` with ``changes`` applied: a value replaces an entry, ``None`` removes it."""
    removed = {key for key, value in changes.items() if value is None}
    return {key: value for key, value in {**entries, **changes}.items() if key not in removed}


def weights(seed: int = 0, *, d_model: int = D_MODEL, d_sae: int = D_SAE, unit_decoder: bool = False) -> dict:
    """Random weights in the release's nn.Linear layout; decoder columns of norm 0.5-1.5 unless ``unit_decoder``."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_model, d_sae, generator=g)
    decoder = decoder / decoder.norm(dim=0) * (1.0 if unit_decoder else 0.5 + torch.rand(d_sae, generator=g))
    return {
        "encoder.weight": torch.randn(d_sae, d_model, generator=g) / d_model**0.5,
        "encoder.bias": 0.1 * torch.randn(d_sae, generator=g),
        "decoder.weight": decoder,
        "decoder.bias": 0.1 * torch.randn(d_model, generator=g),
    }


def write_llama_scope(folder: Path, cfg: dict | None = None, tensors: dict | None = None) -> Path:
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "hyperparams.json").write_text(json.dumps(hyperparams() if cfg is None else cfg, indent=4))
    save_file(weights() if tensors is None else tensors, folder / "checkpoints/final.safetensors")
    return folder


def published(cfg: dict, tensors: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, reconstruction)``: Language-Model-SAEs' from_config, encode and decode (4ec6f0aa), in fp64."""
    w = {key: value.double() for key, value in tensors.items()}
    E, b_e, D = w["encoder.weight"], w["encoder.bias"], w["decoder.weight"]
    b_d = w["decoder.bias"] if cfg.get("use_decoder_bias", True) else torch.zeros(cfg["d_model"], dtype=torch.float64)
    if cfg["norm_activation"] == "dataset-wise":  # standardize_parameters_of_dataset_activation_scaling
        s_in = cfg["d_model"] ** 0.5 / cfg["dataset_average_activation_norm"]["in"]
        s_out = cfg["d_model"] ** 0.5 / cfg["dataset_average_activation_norm"]["out"]
        b_e, b_d, D = b_e / s_in, b_d / s_out, D * s_in / s_out
    if cfg.get("sparsity_include_decoder_norm", True):  # transform_to_unit_decoder_norm
        n = torch.norm(D, p=2, dim=0)
        D, E, b_e = D / n, E * n[:, None], b_e * n
    act, theta = cfg["act_fn"], cfg.get("jump_relu_threshold", 0.0)
    if act == "topk" and theta > 0:
        act = "jumprelu"
    x = x.double()
    if cfg.get("apply_decoder_bias_to_pre_encoder", True):
        x = x - b_d
    h = x @ E.T + b_e
    if act == "jumprelu":
        f = h.where(h > theta, 0)
    elif act == "topk":
        relu = torch.clamp(h, min=0.0)
        top = torch.topk(relu, k=cfg["top_k"], dim=-1)
        f = torch.zeros_like(relu).scatter_(-1, top.indices, relu.gather(-1, top.indices))
    else:
        f = torch.clamp(h, min=0.0)
    return f, f @ D.T + b_d


def _x(n: int = 40, d_model: int = D_MODEL, norm: float = 6.3125) -> torch.Tensor:
    """Inputs whose norms are around the dataset norm, as the SAE saw in training."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d_model, generator=g)
    return x / x.norm(dim=-1, keepdim=True) * norm * (0.5 + torch.rand(n, 1, generator=g))


# ------------------------------------------------------------------------------------- loading


def test_detects_the_folder_and_its_weights_file(tmp_path) -> None:
    folder = write_llama_scope(tmp_path / "Llama3_1-8B-Base-L15R-8x")
    weights_file = folder / "checkpoints/final.safetensors"
    assert detect_format(folder) == ("llama_scope", weights_file)
    assert detect_format(weights_file) == ("llama_scope", weights_file)


def test_a_folder_listing_picks_exactly_the_weights_and_hyperparams() -> None:
    """What Hub loading downloads: the weights sit in the checkpoints/ subfolder of the listing."""
    names = {"hyperparams.json", "README.md", "lm_config.json"}
    assert checkpoint_files(names) == ["checkpoints/final.safetensors", "hyperparams.json"]


CASES = {
    "release (jumprelu)": {},
    "topk with a threshold runs as jumprelu": dict(act_fn="topk"),
    "topk": dict(act_fn="topk", jump_relu_threshold=0.0),
    "topk, no threshold key": dict(act_fn="topk", jump_relu_threshold=None),
    "relu": dict(act_fn="relu"),
    "different in and out norms": dict(dataset_average_activation_norm={"in": 3.0, "out": 9.5}),
    "already standardised": dict(norm_activation="inference"),
    "decoder norm not in the sparsity": dict(sparsity_include_decoder_norm=False),
    "decoder bias subtracted first": dict(apply_decoder_bias_to_pre_encoder=True),
    "no decoder bias": dict(use_decoder_bias=False),
    "defaults of SAEConfig": dict(sparsity_include_decoder_norm=None, apply_decoder_bias_to_pre_encoder=None,
                                  use_decoder_bias=None, use_glu_encoder=None, hook_point_out=None),
}


@pytest.mark.parametrize("changes", list(CASES.values()), ids=list(CASES))
def test_encode_and_decode_match_the_published_equations_in_fp64(tmp_path, changes) -> None:
    cfg, tensors = hyperparams(**changes), weights()
    sae = SAE.load(write_llama_scope(tmp_path / "sae", cfg, tensors), dtype=torch.float64)
    x = _x(norm=cfg.get("dataset_average_activation_norm", {}).get("in", 6.3125))
    f, x_hat = published(cfg, tensors, x)
    assert (f > 0).any() and (f == 0).any()  # the activation is exercised both ways
    torch.testing.assert_close(sae.encode(x), f, **FP64)
    torch.testing.assert_close(sae.decode(f), x_hat, **FP64)
    assert sae.hook_name == "blocks.15.hook_resid_post"


def test_a_zero_decoder_column_never_fires(tmp_path) -> None:
    """The library divides by a zero decoder norm (NaN everywhere); here that feature is inert, and the
    SAE is the published one without it."""
    cfg, tensors = hyperparams(), weights()
    tensors["decoder.weight"][:, 5] = 0.0
    sae = SAE.load(write_llama_scope(tmp_path / "sae", cfg, tensors), dtype=torch.float64)
    x = _x()
    assert torch.isnan(published(cfg, tensors, x)[1]).all()
    alive = torch.arange(D_SAE) != 5
    without = {"encoder.weight": tensors["encoder.weight"][alive], "encoder.bias": tensors["encoder.bias"][alive],
               "decoder.weight": tensors["decoder.weight"][:, alive], "decoder.bias": tensors["decoder.bias"]}
    f, x_hat = published({**cfg, "d_sae": D_SAE - 1}, without, x)
    assert not sae.encode(x)[:, 5].any()
    torch.testing.assert_close(sae.encode(x)[:, alive], f, **FP64)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x_hat, **FP64)


@pytest.mark.parametrize(
    ("hook", "layer", "expected"),
    [
        ("blocks.15.hook_resid_post", None, "blocks.15.hook_resid_post"),
        ("blocks.7.hook_attn_out", None, "blocks.7.hook_attn_out"),
        ("blocks.3.hook_mlp_out", None, "blocks.3.hook_mlp_out"),
        ("blocks.3.hook_mlp_out", 9, "blocks.9.hook_mlp_out"),
    ],
)
def test_the_site_is_hook_point_in(tmp_path, hook, layer, expected) -> None:
    folder = write_llama_scope(tmp_path / "sae", hyperparams(hook_point_in=hook, hook_point_out=hook))
    assert SAE.load(folder, layer=layer).hook_name == expected


# ------------------------------------------------------------------------------------ SAELens

L8R = ("llama_scope_lxr_8x", "l8r_8x", "fnlp/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L8R-8x")
# SAELens's table gives l8r_8x the norm_scaling_factor 64 / 6.3125 (sqrt(4096) / its norm); at
# d_model 16 the same factor is sqrt(16) / 0.39453125.
L8R_NORM = 0.39453125


def _l8r_repo(tmp_path: Path, **changes) -> tuple[Path, dict, dict]:
    """An offline Hub cache of the l8r_8x release holding a small SAE in its folder, a neighbour, and a README."""
    cfg = hyperparams(hook_point_in="blocks.8.hook_resid_post", hook_point_out="blocks.8.hook_resid_post",
                      dataset_average_activation_norm={"in": L8R_NORM, "out": L8R_NORM}, **changes)
    tensors = weights(seed=3, unit_decoder=True)
    source = tmp_path / "source"
    write_llama_scope(source / L8R[3], cfg, tensors)
    write_llama_scope(source / "Llama3_1-8B-Base-L9R-8x", cfg, weights(seed=4))
    (source / "README.md").write_text("Llama Scope")
    files = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
    write_hub_cache(tmp_path / "cache", L8R[2], files, COMMIT)
    return tmp_path / "cache", cfg, tensors


def test_from_release_loads_only_that_sae_offline(directory, offline, fetched, tmp_path) -> None:
    cache, _, _ = _l8r_repo(tmp_path)
    sae = SAE.from_release(*L8R[:2], cache_dir=cache)
    assert fetched == [f"{L8R[3]}/checkpoints/final.safetensors", f"{L8R[3]}/hyperparams.json"]
    assert_same_sae(sae, SAE.load(tmp_path / "source" / L8R[3]))
    assert sae.hook_name == "blocks.8.hook_resid_post"


def test_matches_saelens_where_its_conversion_agrees(offline, tmp_path, monkeypatch) -> None:
    """SAELens's loader, through the real huggingface_hub download path, on the same files.

    With unit decoder norms and equal in/out norms (the case its conversion covers: it ignores
    decoder norms and the output norm) the reconstructions agree and the same features fire;
    SAELens's feature values are ``sqrt(d_model) / norm_in`` times the library's, since it folds
    the input norm into W_enc alone."""
    sae_lens = pytest.importorskip("sae_lens")
    cache, cfg, tensors = _l8r_repo(tmp_path)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(cache))
    theirs = sae_lens.SAE.from_pretrained(*L8R[:2], device="cpu")
    ours = SAE.from_release(*L8R[:2])
    x = _x(norm=L8R_NORM)
    scale = D_MODEL**0.5 / L8R_NORM
    with torch.no_grad():
        f_theirs, f_ours = theirs.encode(x), ours.encode(x)
        assert torch.equal(f_theirs > 0, f_ours > 0) and (f_ours > 0).any()
        torch.testing.assert_close(f_theirs, f_ours * scale, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(f_theirs), ours.decode(f_ours), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_ours.double(), published(cfg, tensors, x)[0], rtol=1e-5, atol=1e-5)
    assert ours.hook_name == theirs.cfg.metadata.hook_name


# --------------------------------------------------------------------------------------- steering


@pytest.fixture(scope="module")
def steered(tmp_path_factory):
    """A tiny Llama steered at blocks.1.hook_resid_post with a Llama Scope SAE written for it."""
    hidden = 32
    hook = "blocks.1.hook_resid_post"
    cfg = hyperparams(hook_point_in=hook, hook_point_out=hook, d_model=hidden, d_sae=96,
                      dataset_average_activation_norm={"in": 4.0, "out": 4.0}, jump_relu_threshold=0.1)
    folder = write_llama_scope(tmp_path_factory.mktemp("llama_scope") / "sae", cfg, weights(seed=5, d_model=hidden, d_sae=96))
    sae = SAE.load(folder)
    model = make_model("llama", hidden=hidden, num_layers=3)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    return model, sc.steer(model, [sae], backend="aot_eager"), sae, ids


@pytest.mark.parametrize(
    "edits",
    [
        [sc.Clamp("blocks.1.hook_resid_post", 3, 5.0), sc.Clamp("blocks.1.hook_resid_post", 8, 0.0, "scale")],
        [sc.Reconstruct("blocks.1.hook_resid_post"), sc.Clamp("blocks.1.hook_resid_post", 2, 2.0, "add")],
    ],
    ids=["clamps", "reconstruct"],
)
def test_steering_matches_the_reference(steered, edits) -> None:
    model, steered_model, sae, ids = steered
    steering = sc.Steering(*edits)
    expected = reference_logits(model, ids, saes={sae.hook_name: sae}, steering=steering)
    assert rel_err(expected, reference_logits(model, ids)) > 1e-3
    with torch.no_grad():
        assert_rel_close(steered_model(ids, steering=steering).logits, expected, 1e-5)


# ------------------------------------------------------------------------------------ bad input

BAD_CONFIG = [
    ("missing d_model", hyperparams(d_model=None), "'d_model'"),
    ("missing act_fn", hyperparams(act_fn=None), "'act_fn'"),
    ("missing threshold", hyperparams(jump_relu_threshold=None), "'jump_relu_threshold'"),
    ("missing norm_activation", hyperparams(norm_activation=None), "'norm_activation'"),
    ("missing dataset norms", hyperparams(dataset_average_activation_norm=None), "'dataset_average_activation_norm'"),
    ("missing input norm", hyperparams(dataset_average_activation_norm={"out": 6.0}), "dataset_average_activation_norm.in"),
    ("zero output norm", hyperparams(dataset_average_activation_norm={"in": 6.0, "out": 0}),
     "dataset_average_activation_norm.out"),
    ("missing hook_point_in", hyperparams(hook_point_in=None, hook_point_out=None), "'hook_point_in'"),
    ("topk k too large", hyperparams(act_fn="topk", jump_relu_threshold=0.0, top_k=D_SAE + 1), "'top_k'"),
    ("negative threshold", hyperparams(jump_relu_threshold=-0.5), "'jump_relu_threshold'"),
    ("string threshold", hyperparams(jump_relu_threshold="0.5"), "'jump_relu_threshold'"),
    ("unknown act_fn", hyperparams(act_fn="batchtopk"), "'act_fn'"),
    ("token-wise norm", hyperparams(norm_activation="token-wise"), "'norm_activation'"),
    ("transcoder", hyperparams(hook_point_out="blocks.15.hook_mlp_out"), "'hook_point_out'"),
    ("glu encoder", hyperparams(use_glu_encoder=True), "'use_glu_encoder'"),
    ("non-bool flag", hyperparams(sparsity_include_decoder_norm="yes"), "'sparsity_include_decoder_norm'"),
]


@pytest.mark.parametrize(("cfg", "key"), [c[1:] for c in BAD_CONFIG], ids=[c[0] for c in BAD_CONFIG])
def test_bad_hyperparams_raise_naming_file_and_key(tmp_path, cfg, key) -> None:
    folder = write_llama_scope(tmp_path / "sae", cfg)
    with pytest.raises(ValueError) as err:
        SAE.load(folder)
    assert_names(err, folder / "hyperparams.json", key)


def _tensors(**changes) -> dict:
    return changed(weights(), changes)


BAD_WEIGHTS = [
    ("encoder transposed", _tensors(**{"encoder.weight": torch.randn(D_MODEL, D_SAE)}), "encoder.weight"),
    ("decoder transposed", _tensors(**{"decoder.weight": torch.randn(D_SAE, D_MODEL)}), "decoder.weight"),
    ("encoder bias too short", _tensors(**{"encoder.bias": torch.randn(D_SAE - 1)}), "encoder.bias"),
    ("missing decoder bias", _tensors(**{"decoder.bias": None}), "decoder.bias"),
    ("non-finite encoder", _tensors(**{"encoder.weight": torch.full((D_SAE, D_MODEL), float("nan"))}), "encoder.weight"),
]


@pytest.mark.parametrize(("tensors", "key"), [c[1:] for c in BAD_WEIGHTS], ids=[c[0] for c in BAD_WEIGHTS])
def test_bad_weights_raise_naming_file_and_key(tmp_path, tensors, key) -> None:
    folder = write_llama_scope(tmp_path / "sae", tensors=tensors)
    with pytest.raises(ValueError) as err:
        SAE.load(folder)
    assert_names(err, folder / "checkpoints/final.safetensors", key)


def test_corrupt_safetensors_names_the_file(tmp_path) -> None:
    folder = write_llama_scope(tmp_path / "sae")
    weights_file = folder / "checkpoints/final.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot be read") as err:
        SAE.load(folder)
    assert str(weights_file) in str(err.value)


def test_invalid_json_and_missing_weights_name_the_file(tmp_path) -> None:
    folder = write_llama_scope(tmp_path / "sae")
    (folder / "hyperparams.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        SAE.load(folder)
    assert str(folder / "hyperparams.json") in str(err.value)
    (folder / "checkpoints/final.safetensors").unlink()
    with pytest.raises(ValueError, match="no such file") as err:
        SAE.load(folder)
    assert str(folder / "checkpoints/final.safetensors") in str(err.value)
