"""What ``sae_compile.vllm.LLM`` rejects before any engine starts, and that nothing but the
vllm subpackage imports vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from sae_compile import FeatureRecord  # noqa: E402
from sae_compile.vllm import LLM  # noqa: E402
from sae_compile.vllm.records import record_from_wire, record_to_wire  # noqa: E402
from sae_compile.vllm.serve import serve  # noqa: E402
from tests.factories import random_sae  # noqa: E402
from tests.serving.engine_models import HIDDEN  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize(
    ("saes", "kwargs", "message"),
    [
        ({"blocks.7.hook_resid_post": random_sae(HIDDEN, 8)}, {}, "Unknown site"),
        ({"model.layers.0": random_sae(HIDDEN, 8)}, {}, "Unknown site"),
        ({"blocks.0.attn.hook_z": random_sae(HIDDEN, 8)}, {}, "inside a branch"),
        ({"blocks.0.hook_resid_post": random_sae(HIDDEN + 1, 8)}, {}, "d_in"),
        ({"blocks.0.hook_resid_post": 3}, {}, "must be an SAE or the path"),
        ({}, {"max_rows": 2, "max_num_seqs": 4}, "max_rows=2 is less than max_num_seqs=4"),
        ({}, {"worker_cls": "x.Y"}, "sets worker_cls"),
        ({}, {"enforce_eager": True}, "compiles nothing"),
        ({}, {"max_top_k": -1}, "max_top_k must be at least 0"),
    ],
)
def test_bad_engine_arguments_raise_before_starting(folder, saes, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LLM(str(folder), saes, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_record_travels_bit_exactly(dtype):
    top_k = FeatureRecord(torch.randn(1, 5, 3).to(dtype), torch.randint(-1, 40, (1, 5, 3)), None)
    dense = FeatureRecord(torch.randn(1, 4, 2).to(dtype), None, (7, 1))
    for record in (top_k, dense):
        back = record_from_wire(record_to_wire(record))
        assert back.values.dtype == dtype and torch.equal(back.values, record.values)
        assert back.features == record.features
        assert (back.indices is None and record.indices is None) or torch.equal(back.indices, record.indices)


def test_a_recording_server_refuses_the_prefix_cache(folder):
    with pytest.raises(ValueError, match="prefix-cache hit would skip"):
        serve(str(folder), {}, [], 16, 4, ["--enable-prefix-caching"])


def test_nothing_else_imports_vllm():
    modules = "sae_compile, sae_compile.cli, sae_compile.demo, sae_compile.steered, sae_compile.checkpoints"
    modules += ", sae_compile.lowering.backend, sae_compile.lowering.engine_pass, sae_compile.runtime.engine"
    modules += ", sae_compile.runtime.engine_recording, sae_compile.features, sae_compile.wire"
    code = f"import sys, {modules}; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
