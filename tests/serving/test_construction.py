"""What ``sae_compile.vllm.LLM`` rejects before any engine starts, and that nothing but the
vllm subpackage imports vLLM."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from sae_compile.vllm import LLM  # noqa: E402
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


def test_nothing_else_imports_vllm():
    modules = "sae_compile, sae_compile.cli, sae_compile.demo, sae_compile.steered, sae_compile.checkpoints"
    modules += ", sae_compile.lowering.backend, sae_compile.lowering.engine_pass, sae_compile.runtime.engine"
    code = f"import sys, {modules}; print('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
