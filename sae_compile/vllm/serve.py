"""``sae-compile serve``: vLLM's OpenAI-compatible server, steering each request that asks.

A request steers itself with ``"vllm_xargs": {"sae_steering": "<Steering JSON>"}``; vLLM puts
``vllm_xargs`` into the request's ``extra_args``, the validator checks the steering as the
request arrives (a bad one is answered with HTTP 400 and the message), and the workers steer
it. Requests without it are unsteered.

A server started with ``max_top_k`` also records features: a request adds ``"sae_record":
"<record JSON>"`` (``features_to_json``) and ``"sae_record_key": "<its own key>"`` to its
``vllm_xargs``, and once it has finished, ``POST /v1/sae_features`` with ``{"keys": [...]}``
answers what it recorded (``records_endpoint``). Such a server reads no prefix cache, so that
every prompt position is computed, and recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
import uvloop
from vllm.entrypoints.launchers.api_server.entry import run_server
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.logger import configure_logging_from_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

from ..sae import SAE
from . import validation
from .offline import WORKER_CLS
from .spec import CONFIG_KEY, EngineSpec

VALIDATOR = "sae_compile.vllm.validation:SteeringValidator"
RECORDS_ENDPOINT = "sae_compile.vllm.records_endpoint.RecordsEndpoint"


def serve(
    model: str, saes: Mapping[str, str], sites: Sequence[str], max_clamps: int, max_top_k: int, vllm_args: Sequence[str]
) -> int:
    """Serve ``model`` with SAEs (site -> folder) and additive ``sites`` until interrupted;
    requests record up to ``max_top_k`` features per token and site (0: they cannot record).

    ``vllm_args`` are ``vllm serve``'s own options (``--port``, ``--dtype``, ...). Bad input
    (an unknown site, an SAE that does not fit, a malformed option) raises ValueError before
    anything starts.
    """
    spec = EngineSpec({**dict.fromkeys(sites), **saes}, max_clamps, max_top_k)
    args = _server_args(model, spec, vllm_args)
    if getattr(args, "api_server_count", 1) not in (None, 1):
        raise ValueError("sae-compile serve validates requests in its own process: --api-server-count must be 1.")
    config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=bool(args.trust_remote_code))
    loaded = {site: SAE.load(path) for site, path in saes.items()}
    validation.register(validation.front_end_shapes(loaded, sites, config.get_text_config(), max_clamps, max_top_k), served=True)
    configure_logging_from_args(args)
    uvloop.run(run_server(args))
    return 0


def _server_args(model: str, spec: EngineSpec, vllm_args: Sequence[str]) -> Any:
    for option in ("--worker-cls", "--additional-config", "--logits-processors", "--model"):
        if any(arg == option or arg.startswith(option + "=") for arg in vllm_args):
            raise ValueError(f"sae-compile serve sets {option} itself; it cannot be passed to vLLM.")
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="sae-compile serve"))
    args = parser.parse_args([
        "--model", model,
        "--worker-cls", WORKER_CLS,
        "--additional-config", json.dumps({CONFIG_KEY: spec.to_config()}),
        "--logits-processors", VALIDATOR,
        "--middleware", RECORDS_ENDPOINT,
        *vllm_args,
    ])
    validate_parsed_serve_args(args)
    if spec.max_top_k:
        if args.enable_prefix_caching:
            raise ValueError(
                "sae-compile serve --max-top-k records every prompt position, which a prefix-cache hit would skip: "
                "drop --enable-prefix-caching, or serve without recording (--max-top-k 0)."
            )
        args.enable_prefix_caching = False
    return args
