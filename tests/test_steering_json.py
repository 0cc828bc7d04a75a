"""Steering.to_json / Steering.from_json: exact round trips and the rejection of bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sae_compile.edits import CLAMP_MODES, TOKEN_SCOPES, AddVector, Clamp, Reconstruct, Steering

SITE = "blocks.1.hook_resid_post"

# Finite doubles over the whole range: negative, subnormal (tiny) and near float max (huge).
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
float32_values = st.floats(width=32, allow_nan=False, allow_infinity=False)
sites = st.builds(
    "blocks.{}.hook_{}".format,
    st.integers(0, 95),
    st.sampled_from(["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]),
)
clamps = st.builds(
    Clamp, site=sites, feature=st.integers(0, 2**40), value=finite_floats, mode=st.sampled_from(CLAMP_MODES)
)
add_vectors = st.builds(
    AddVector,
    site=sites,
    vector=st.lists(float32_values, min_size=1, max_size=16).map(lambda v: torch.tensor(v, dtype=torch.float32)),
    scale=finite_floats,
)
reconstructs = st.builds(Reconstruct, site=sites)


@st.composite
def steerings(draw) -> Steering:
    edits = draw(st.lists(st.one_of(clamps, add_vectors, reconstructs), max_size=6))
    return Steering(*edits, tokens=draw(st.sampled_from(TOKEN_SCOPES)))


def assert_same_steering(got: Steering, want: Steering) -> None:
    """Field by field and bit by bit, so a lost sign of zero or a rounded vector shows up."""
    assert got.tokens == want.tokens
    assert len(got.edits) == len(want.edits)
    for g, w in zip(got.edits, want.edits, strict=True):
        assert type(g) is type(w)
        assert g.site == w.site
        if isinstance(w, Clamp):
            assert (g.feature, g.mode) == (w.feature, w.mode)
            assert type(g.value) is float and g.value.hex() == w.value.hex()
        elif isinstance(w, AddVector):
            assert type(g.scale) is float and g.scale.hex() == w.scale.hex()
            assert g.vector.dtype == torch.float32 and g.vector.shape == w.vector.shape
            assert torch.equal(g.vector.view(torch.int32), w.vector.view(torch.int32))


@given(steerings())
def test_round_trip_is_exact(steering: Steering) -> None:
    text = steering.to_json()
    assert isinstance(text, str)
    data = json.loads(text)
    assert data["tokens"] == steering.tokens
    assert [edit["type"] for edit in data["edits"]] == [
        {Clamp: "clamp", AddVector: "add_vector", Reconstruct: "reconstruct"}[type(e)] for e in steering.edits
    ]
    back = Steering.from_json(text)
    assert back == steering
    assert_same_steering(back, steering)


def test_to_json_writes_every_field() -> None:
    steering = Steering(Clamp(SITE, 3, 5.0), AddVector(SITE, torch.tensor([0.5, -2.0]), scale=0.25), Reconstruct(SITE))
    assert json.loads(steering.to_json()) == {
        "tokens": "all",
        "edits": [
            {"type": "clamp", "site": SITE, "feature": 3, "value": 5.0, "mode": "set"},
            {"type": "add_vector", "site": SITE, "vector": [0.5, -2.0], "scale": 0.25},
            {"type": "reconstruct", "site": SITE},
        ],
    }


def test_schema_example_and_defaults() -> None:
    text = json.dumps(
        {
            "edits": [
                {"type": "clamp", "site": SITE, "feature": 3, "value": 5},
                {"type": "add_vector", "site": "blocks.2.hook_mlp_out", "vector": [1, 0.1]},
                {"type": "reconstruct", "site": SITE},
            ]
        }
    )
    steering = Steering.from_json(text)
    want = Steering(
        Clamp(SITE, 3, 5.0, "set"),
        AddVector("blocks.2.hook_mlp_out", torch.tensor([1.0, 0.1], dtype=torch.float32), 1.0),
        Reconstruct(SITE),
        tokens="all",
    )
    assert_same_steering(steering, want)
    assert Steering.from_json('{"edits": []}') == Steering()


def test_scope_and_explicit_fields_are_read() -> None:
    text = json.dumps(
        {
            "tokens": "generated",
            "edits": [
                {"type": "clamp", "site": SITE, "feature": 7, "value": -2, "mode": "scale"},
                {"type": "add_vector", "site": SITE, "vector": [3.0], "scale": 4},
            ],
        }
    )
    want = Steering(Clamp(SITE, 7, -2.0, "scale"), AddVector(SITE, torch.tensor([3.0]), 4.0), tokens="generated")
    assert_same_steering(Steering.from_json(text), want)


def test_float64_vectors_come_back_as_float32() -> None:
    vector = torch.tensor([0.1, -1e-300], dtype=torch.float64)
    back = Steering.from_json(Steering(AddVector(SITE, vector)).to_json())
    assert back.edits[0].vector.dtype == torch.float32
    assert torch.equal(back.edits[0].vector, vector.float())


def clamp(**fields: object) -> dict:
    return {"type": "clamp", "site": SITE, "feature": 3, "value": 5.0, **fields}


def add_vector(**fields: object) -> dict:
    return {"type": "add_vector", "site": SITE, "vector": [0.5, 1.0], **fields}


def edits(*items: object, **top: object) -> str:
    return json.dumps({"edits": list(items), **top})


def without(edit: dict, name: str) -> dict:
    return {key: value for key, value in edit.items() if key != name}


REJECTIONS = [
    # not JSON, or not the right shape at the top
    ('{"edits": [', "not valid JSON: Expecting value: line 1 column 12"),
    ("", "not valid JSON: Expecting value"),
    ('{"edits": []} x', "not valid JSON: Extra data"),
    ("[]", "the top level must be an object, got a list"),
    ("null", "the top level must be an object, got null"),
    ('"edits"', "the top level must be an object, got a string"),
    ('{"edits": [], "token": "all"}', "unknown top-level key(s) 'token'; allowed: 'tokens', 'edits'"),
    ('{"tokens": "all"}', "missing top-level key 'edits'"),
    ('{"edits": {"type": "reconstruct"}}', "'edits' must be a list of edit objects, got an object"),
    ('{"edits": "clamp"}', "'edits' must be a list of edit objects, got a string"),
    ('{"edits": [], "edits": []}', "duplicate key 'edits' in an object"),
    (
        edits(clamp(), tokens="sometimes"),
        "Steering: tokens must be one of ('all', 'prompt', 'generated'), got 'sometimes'",
    ),
    (edits(clamp(), tokens=1), "Steering: tokens must be a string"),
    # the edit objects
    (edits(clamp(), 3), "edits[1]: an edit must be an object, got an integer"),
    (edits([clamp()]), "edits[0]: an edit must be an object, got a list"),
    (edits(without(clamp(), "type")), "edits[0]: missing 'type'; expected one of 'clamp', 'add_vector', 'reconstruct'"),
    (edits(clamp(type="clip")), "edits[0]: unknown type 'clip'; expected one of"),
    (edits(clamp(type=None)), "edits[0]: unknown type null; expected one of"),
    (edits(clamp(), without(clamp(), "value")), "edits[1]: clamp edit is missing field(s) 'value'"),
    (edits({"type": "clamp", "site": SITE}), "edits[0]: clamp edit is missing field(s) 'feature', 'value'"),
    (edits(without(add_vector(), "vector")), "edits[0]: add_vector edit is missing field(s) 'vector'"),
    (edits({"type": "reconstruct"}), "edits[0]: reconstruct edit is missing field(s) 'site'"),
    (edits(clamp(scale=1.0)), "edits[0]: clamp edit has unknown field(s) 'scale'; allowed: 'type', 'site', 'feature'"),
    (
        edits({"type": "reconstruct", "site": SITE, "feature": 1}),
        "edits[0]: reconstruct edit has unknown field(s) 'feature'",
    ),
    (edits(add_vector(scales=2.0, x=1)), "edits[0]: add_vector edit has unknown field(s) 'scales', 'x'; allowed:"),
    # field types, checked by the edit constructors and reported with the edit's index
    (edits(clamp(), clamp(), clamp(feature=-1)), "edits[2]: Clamp: feature must be >= 0, got -1."),
    (edits(clamp(feature="3")), "edits[0]: Clamp: feature must be an int index, got str"),
    (edits(clamp(feature=3.5)), "edits[0]: Clamp: feature must be an int index, got float"),
    (edits(clamp(feature=3.0)), "edits[0]: Clamp: feature must be an int index, got float"),
    (edits(clamp(feature=True)), "edits[0]: Clamp: feature must be an int index, got bool"),
    (edits(clamp(value="5")), "edits[0]: Clamp: value must be a real number, got str"),
    (edits(clamp(value=False)), "edits[0]: Clamp: value must be a real number, got bool"),
    (edits(clamp(value=None)), "edits[0]: Clamp: value must be a real number, got NoneType"),
    (edits(clamp(mode="multiply")), "edits[0]: Clamp: mode must be one of ('set', 'add', 'scale'), got 'multiply'"),
    (edits(clamp(mode=1)), "edits[0]: Clamp: mode must be a string"),
    (edits(clamp(site=1)), "edits[0]: Clamp: site must be a string"),
    (edits({"type": "reconstruct", "site": None}), "edits[0]: Reconstruct: site must be a string"),
    (edits(add_vector(site=["a"])), "edits[0]: AddVector: site must be a string"),
    (edits(add_vector(scale="2")), "edits[0]: AddVector: scale must be a real number, got str"),
    (edits(add_vector(scale=True)), "edits[0]: AddVector: scale must be a real number, got bool"),
    # vectors
    (edits(add_vector(vector="0.5,1.0")), "edits[0]: vector must be a list of numbers, got a string"),
    (edits(add_vector(vector={"0": 1.0})), "edits[0]: vector must be a list of numbers, got an object"),
    (edits(add_vector(vector=0.5)), "edits[0]: vector must be a list of numbers, got a number"),
    (edits(add_vector(vector=[])), "edits[0]: vector must not be empty"),
    (edits(add_vector(vector=[1.0, "2"])), "edits[0]: vector[1] must be a number, got a string"),
    (edits(add_vector(vector=[1.0, True])), "edits[0]: vector[1] must be a number, got a boolean"),
    (edits(add_vector(vector=[None])), "edits[0]: vector[0] must be a number, got null"),
    (edits(add_vector(vector=[[1.0, 2.0]])), "edits[0]: vector[0] must be a number, got a list"),
    (edits(add_vector(vector=[1.0, 1e39])), "edits[0]: vector[1] = 1e+39 is too large for a float32"),
    (edits(add_vector(vector=[10**400])), "edits[0]: vector[0] is too large for a float32"),
    # NaN and inf: Python's json reads these literals, standard JSON has none
    ('{"edits": [{"type": "clamp", "site": "s", "feature": 3, "value": NaN}]}', "NaN is not allowed"),
    ('{"edits": [{"type": "clamp", "site": "s", "feature": 3, "value": Infinity}]}', "Infinity is not allowed"),
    ('{"edits": [{"type": "add_vector", "site": "s", "vector": [1.0, -Infinity]}]}', "-Infinity is not allowed"),
    ('{"edits": [{"type": "add_vector", "site": "s", "vector": [1.0], "scale": NaN}]}', "NaN is not allowed"),
    ('{"edits": [{"type": "clamp", "site": "s", "feature": 3, "value": 1e400}]}', "number 1e400 is too large"),
    (edits(clamp(value=10**400)), "edits[0]: Clamp: value must be finite, got an int too large for a float"),
]


@pytest.mark.parametrize(("text", "message"), REJECTIONS)
def test_rejects_malformed_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape("steering JSON: " + message)) as info:
        Steering.from_json(text)
    # A ValueError subclass would do for callers, but JSONDecodeError would hide which rule failed.
    assert type(info.value) is ValueError


@pytest.mark.parametrize("text", [b'{"edits": []}', {"edits": []}, None])
def test_rejects_text_that_is_not_a_str(text: object) -> None:
    with pytest.raises(ValueError, match=r"^steering JSON: expected the JSON text as a str, got "):
        Steering.from_json(text)  # type: ignore[arg-type]
