"""Goodfire's released Llama 3 SAEs: a ``.pth`` state dict, read with torch's weights-only loader.

Goodfire publishes no library on the package index, so the tests write the state dict in the
released layout with ``torch.save``. The layout and equations are those of the ``SparseAutoEncoder``
class on Goodfire's model card (huggingface.co/Goodfire/Llama-3.1-8B-Instruct-SAE-l19), which
SAELens's ``goodfire`` loader (``sae_lens/loading/pretrained_sae_loaders.py``) reads the same way:

    encoder_linear.weight [F, D], encoder_linear.bias [F], decoder_linear.weight [D, F], decoder_linear.bias [D]
    f     = relu(x @ encoder_linear.weight.T + encoder_linear.bias)     (no b_dec subtraction)
    x_hat = f @ decoder_linear.weight.T + decoder_linear.bias
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_compile import SAE
from sae_compile.checkpoints import detect_format

D_IN, D_SAE = 16, 64
RELEASE_NAME = "Llama-3.1-8B-Instruct-SAE-l19.pth"


def goodfire_state(seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    """A state dict in Goodfire's released layout, every parameter random."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_linear.weight": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "encoder_linear.bias": 0.1 * torch.randn(d_sae, generator=g),
        "decoder_linear.weight": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "decoder_linear.bias": 0.1 * torch.randn(d_in, generator=g),
    }


def write_goodfire(file: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(goodfire_state() if state is None else state, file)
    return file


def goodfire_reference(s: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The published encode/decode (module docstring), in float64."""
    s = {k: v.double() for k, v in s.items()}
    f = torch.relu(x.double() @ s["encoder_linear.weight"].T + s["encoder_linear.bias"])
    return f, f @ s["decoder_linear.weight"].T + s["decoder_linear.bias"]


def _x(n: int = 20) -> torch.Tensor:
    return 2 * torch.randn(n, D_IN, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", [RELEASE_NAME, "Llama-3.3-70B-Instruct-SAE-l50.pt", "sae.pth"])
def test_goodfire_matches_the_published_equations_in_fp64(tmp_path, name) -> None:
    state = goodfire_state()
    file = write_goodfire(tmp_path / name, state)
    assert detect_format(file) == ("goodfire", file)
    sae = SAE.load(file, dtype=torch.float64)
    x = _x()
    f_ref, x_hat_ref = goodfire_reference(state, x)
    assert (f_ref > 0).any() and (f_ref == 0).any()  # the ReLU is exercised both ways
    torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.decode(f_ref), x_hat_ref, rtol=1e-12, atol=1e-12)
    assert (sae.activation, sae.apply_b_dec_to_input, sae.k, sae.threshold) == ("relu", False, None, None)


@pytest.mark.parametrize(
    ("name", "hook_name"),
    [
        (RELEASE_NAME, "blocks.19.hook_resid_post"),
        ("Llama-3.3-70B-Instruct-SAE-l50.pt", "blocks.50.hook_resid_post"),
        ("my_sae.pth", None),
    ],
)
def test_goodfire_site_comes_from_the_release_file_name(tmp_path, name, hook_name) -> None:
    assert SAE.load(write_goodfire(tmp_path / name)).hook_name == hook_name


def test_goodfire_layer_and_hook_name_overrides(tmp_path) -> None:
    file = write_goodfire(tmp_path / RELEASE_NAME)
    assert SAE.load(file, layer=3).hook_name == "blocks.3.hook_resid_post"
    assert SAE.load(file, hook_name="blocks.2.hook_mlp_out").hook_name == "blocks.2.hook_mlp_out"


def test_a_folder_with_one_pth_file_loads_it(tmp_path) -> None:
    file = write_goodfire(tmp_path / "release" / RELEASE_NAME)
    (tmp_path / "release" / "README.md").write_text("model card")
    assert detect_format(tmp_path / "release") == ("goodfire", file)
    assert torch.equal(SAE.load(tmp_path / "release").W_enc, SAE.load(file).W_enc)


def test_goodfire_matches_saelens_goodfire_loader(tmp_path, monkeypatch) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.loading import pretrained_sae_loaders as loaders

    file = write_goodfire(tmp_path / RELEASE_NAME)
    # SAELens's loader downloads the release file; hand it ours instead.
    monkeypatch.setattr(loaders, "hf_hub_download", lambda **kwargs: str(file))
    cfg, state, _ = loaders.get_goodfire_huggingface_loader(
        "Goodfire/Llama-3.1-8B-Instruct-SAE-l19", RELEASE_NAME, cfg_overrides={"d_in": D_IN, "d_sae": D_SAE}
    )
    ref = sae_lens.SAE.from_dict(cfg)
    ref.load_state_dict(state)
    sae, x = SAE.load(file), _x()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), ref.encode(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sae.decode(sae.encode(x)), ref.decode(ref.encode(x)), rtol=1e-6, atol=1e-6)
    assert sae.hook_name == cfg["hook_name"]


# ------------------------------------------------------------------------------------- bad files


def _without(key: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in goodfire_state().items() if k != key}


def _with(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**goodfire_state(), key: value}


BAD = [
    ("missing decoder weight", _without("decoder_linear.weight"), "decoder_linear.weight"),
    ("missing encoder bias", _without("encoder_linear.bias"), "encoder_linear.bias"),
    ("missing decoder bias", _without("decoder_linear.bias"), "decoder_linear.bias"),
    ("decoder not transposed", _with("decoder_linear.weight", torch.randn(D_SAE, D_IN)), "decoder_linear.weight"),
    ("encoder bias too short", _with("encoder_linear.bias", torch.randn(D_SAE - 1)), "encoder_linear.bias"),
    ("decoder bias too long", _with("decoder_linear.bias", torch.randn(D_IN + 1)), "decoder_linear.bias"),
    ("encoder not a matrix", _with("encoder_linear.weight", torch.randn(D_SAE * D_IN)), "encoder_linear.weight"),
    ("non-finite encoder", _with("encoder_linear.weight", torch.full((D_SAE, D_IN), float("nan"))),
     "encoder_linear.weight"),
    ("integer decoder bias", _with("decoder_linear.bias", torch.zeros(D_IN, dtype=torch.int64)), "decoder_linear.bias"),
]


@pytest.mark.parametrize(("state", "key"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_goodfire_files_raise_naming_file_and_key(tmp_path, state, key) -> None:
    file = write_goodfire(tmp_path / RELEASE_NAME, state)
    with pytest.raises(ValueError) as err:
        SAE.load(file)
    assert str(file) in str(err.value) and key in str(err.value), str(err.value)


def test_a_pth_without_goodfire_keys_is_an_unknown_layout(tmp_path) -> None:
    file = write_goodfire(tmp_path / "other.pth", {"W": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="unknown SAE checkpoint layout") as err:
        SAE.load(file)
    assert str(file) in str(err.value) and "'W'" in str(err.value)


class TouchOnUnpickle:
    """Pickles as a call that creates ``marker``: unpickling it would run code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def assert_load_fails_naming(file: Path, match: str) -> None:
    with pytest.raises(ValueError, match=match) as err:
        SAE.load(file)
    assert str(file) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\x00not a torch file\xff" * 8])
def test_a_corrupt_pth_names_the_file(tmp_path, content) -> None:
    file = tmp_path / RELEASE_NAME
    file.write_bytes(content)
    assert_load_fails_naming(file, "cannot be read as a state dict")


def test_a_pickled_object_is_never_unpickled(tmp_path) -> None:
    marker = tmp_path / "ran"
    file = write_goodfire(tmp_path / RELEASE_NAME, {**goodfire_state(), "extra": TouchOnUnpickle(marker)})
    assert_load_fails_naming(file, "never unpickled")
    assert not marker.exists()
