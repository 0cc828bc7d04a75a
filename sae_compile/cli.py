"""The ``sae-compile`` command line: ``demo``, ``sites``, ``generate``, ``features``, ``bench`` and ``serve``.

Each subcommand is a thin wrapper over the public API. Bad input (a malformed ``--clamp``, an
unknown site, a missing file) is reported as one ``sae-compile: error: ...`` line on stderr
with exit status 2, never a traceback.

``transformers`` is imported only where a model is loaded, after the cheap checks, so that
``--help`` and mistakes in the arguments answer without its multi-second import.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

import sae_compile as sc

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: ``sae-compile bench`` runs this script; it exists only in a source checkout.
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_overhead.py"
#: Errors that mean "the user's input is wrong"; anything else is a bug and keeps its traceback.
#: OSError rather than only FileNotFoundError: transformers raises it for an unreadable checkpoint.
#: Not TypeError: the library raises it for a wrongly typed argument, and here the CLI builds
#: every argument itself, so one would be a bug in the CLI.
USER_ERRORS = (ValueError, OSError)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one stderr line (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sae-compile`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" belongs to the program a command runs (bench, serve); argparse would
    # otherwise read it as its own options.
    head, passthrough = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = _build_parser()
    args = parser.parse_args(head)
    if passthrough and args.command not in ("bench", "serve"):
        parser.error(f"only bench and serve take arguments after --, got {' '.join(passthrough)!r}")
    args.passthrough = passthrough
    try:
        return args.run(args)
    except USER_ERRORS as err:
        message = " ".join(str(err).split())  # exactly one line, however the message was wrapped
        print(f"sae-compile: error: {message}", file=sys.stderr)
        return 2


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-compile", description="Steer Hugging Face models with SAE features inside torch.compile.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="steer a small offline model and show outputs, recompiles and latency")
    demo.add_argument("--backend", default="inductor", help="inner compile backend (default: inductor; aot_eager is fastest to compile)")
    demo.set_defaults(run=_demo)

    sites = commands.add_parser("sites", help="list a model's steering sites and their shapes")
    sites.add_argument("model", metavar="MODEL", help="local Hugging Face checkpoint directory")
    sites.set_defaults(run=_sites)

    gen = commands.add_parser("generate", help="greedy generation with SAE steering")
    _add_model_and_steering(gen)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.set_defaults(run=_generate)

    features = commands.add_parser("features", help="each prompt token's top SAE features, as a table (or JSON)")
    _add_model_and_steering(features)
    features.add_argument("--top", type=int, default=10, help="features shown per token (default: 10)")
    features.add_argument("--json", type=Path, metavar="FILE", help="also write the table's data to FILE as JSON")
    features.set_defaults(run=_features)

    bench = commands.add_parser(
        "bench", help="run the overhead benchmark (source checkout only)",
        epilog="Arguments after -- go to the benchmark script.",
    )
    bench.add_argument("--script", type=Path, default=BENCH_SCRIPT, help=argparse.SUPPRESS)  # tests point it elsewhere
    bench.set_defaults(run=_bench)

    _add_serve(commands)
    return parser


def _add_model_and_steering(command: argparse.ArgumentParser) -> None:
    """The model, SAE, prompt and steering options that generate and features share."""
    command.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (with its tokenizer)")
    command.add_argument("--sae", help="SAE checkpoint: a local folder or file (SAELens, Gemma Scope, sparsify, "
                         "dictionary_learning or Goodfire), hf://OWNER/NAME[@REV]/PATH on the Hugging Face Hub, "
                         "or a SAELens release saelens://RELEASE/SAE_ID")
    command.add_argument("--clamp", action="append", default=[], type=_parse_clamp, metavar="SITE:FEATURE=VALUE[:MODE]",
                         help="clamp an SAE feature; MODE is set (default), add or scale; repeatable")
    command.add_argument("--add-vector", action="append", default=[], type=_parse_add_vector, metavar="SITE:FILE[:SCALE]",
                         help="add a 1-D vector (.pt, .safetensors or .npy) times SCALE at SITE; repeatable")
    command.add_argument("--reconstruct", action="append", default=[], type=sc.Reconstruct, metavar="SITE",
                         help="replace SITE by its SAE reconstruction; repeatable")
    command.add_argument("--steer", type=_parse_steering, metavar="JSON",
                         help="a whole steering as JSON (Steering.to_json; see the README), applied with the flags above")
    command.add_argument("--tokens", choices=("all", "prompt", "generated"), default="all", help="which positions are steered")
    command.add_argument("--prompt", required=True)
    command.add_argument("--backend", default="inductor", help="inner compile backend (default: inductor)")
    command.add_argument("--device", default="cpu", help="torch device for the model and SAE (default: cpu)")


def _add_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve MODEL with vLLM's OpenAI-compatible server, steered per request",
        usage="sae-compile serve MODEL [--sae SITE=PATH ...] [--site SITE ...] [-- VLLM_SERVE_ARGS ...]",
        epilog="Arguments after -- go to vllm serve (--port, --dtype, --tensor-parallel-size, ...).",
    )
    serve.add_argument("model", metavar="MODEL", help="local Hugging Face checkpoint directory (with its tokenizer)")
    serve.add_argument("--sae", action="append", default=[], type=_parse_site_path, metavar="SITE=PATH",
                       help="attach the SAE folder PATH at SITE; repeatable")
    serve.add_argument("--site", action="append", default=[], metavar="SITE", help="attach SITE for AddVector only; repeatable")
    serve.add_argument("--max-clamps", type=int, default=16, help="clamped features per request and site (default: 16)")
    serve.add_argument("--max-top-k", type=int, default=0,
                       help="widest feature record a request may ask for (default: 0, requests cannot record)")
    serve.set_defaults(run=_serve)


def _parse_site_path(text: str) -> tuple[str, str]:
    """``SITE=PATH`` -> ``(SITE, PATH)``."""
    site, equals, path = text.partition("=")
    if not (site and equals and path):
        raise argparse.ArgumentTypeError(f"expected SITE=PATH, got {text!r}")
    return site, path


def _parse_clamp(text: str) -> sc.Clamp:
    """``SITE:FEATURE=VALUE[:MODE]`` -> ``Clamp``. Site names hold no ':', so the first one ends it."""
    site, colon, rest = text.partition(":")
    feature, equals, value_mode = rest.partition("=")
    value, _, mode = value_mode.partition(":")
    syntax = argparse.ArgumentTypeError(
        f"expected SITE:FEATURE=VALUE[:MODE] with an integer FEATURE and a numeric VALUE, got {text!r}"
    )
    if not (site and colon and equals):
        raise syntax
    try:
        index, number = int(feature), float(value)
    except ValueError:
        raise syntax from None
    try:
        return sc.Clamp(site, index, number, mode or "set")
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def _parse_steering(text: str) -> sc.Steering:
    try:
        return sc.Steering.from_json(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--steer: {err}") from None


def _parse_add_vector(text: str) -> tuple[str, Path, float]:
    """``SITE:FILE[:SCALE]`` -> ``(site, file, scale)``; a last part that is not a number belongs to FILE."""
    site, colon, rest = text.partition(":")
    file, _, scale = rest.rpartition(":")
    try:
        factor = float(scale)
    except ValueError:
        file, factor = rest, 1.0
    if not (site and colon and file):
        raise argparse.ArgumentTypeError(f"expected SITE:FILE[:SCALE], got {text!r}")
    return site, Path(file), factor


def _demo(args: argparse.Namespace) -> int:
    from . import demo  # imports transformers and tokenizers, which only this command needs

    return demo.run(args.backend)


def _sites(args: argparse.Namespace) -> int:
    # backend="eager": listing sites runs discovery only; nothing is compiled.
    steered = sc.steer(_load_model(args.model), backend="eager")
    shapes = steered.site_shapes()
    width = max(map(len, shapes))
    print(f"{'site':<{width}}  shape (on a 1x2-token probe)")
    for site, shape in shapes.items():
        print(f"{site:<{width}}  {list(shape)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    steered, saes, steering = _steered_from(args)
    tokenizer = _load_tokenizer(args.model)
    batch = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.no_grad():
        out = steered.generate(
            batch.input_ids, attention_mask=batch.attention_mask, steering=steering,
            max_new_tokens=args.max_new_tokens, do_sample=False,
        )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def _features(args: argparse.Namespace) -> int:
    if args.sae is None:
        raise ValueError("features reads an SAE's activations, so it needs --sae PATH.")
    if args.top < 1:
        raise ValueError(f"--top must be at least 1, got {args.top}.")
    steered, saes, steering = _steered_from(args, max_top_k=args.top)
    (site, sae), = saes.items()
    tokenizer = _load_tokenizer(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(args.device)
    with torch.no_grad():
        record = steered(ids, steering=steering, record=[sc.Features(site, top_k=min(args.top, sae.d_sae))]).features[site]
    rows = _feature_rows(tokenizer.convert_ids_to_tokens(ids[0].tolist()), record)
    print(f"features at {site} (top {record.values.shape[-1]} per token)")
    print(_feature_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps({"site": site, "prompt": args.prompt, "tokens": rows}, indent=2) + "\n")
    return 0


def _feature_rows(tokens: list[str], record: sc.FeatureRecord) -> list[dict[str, object]]:
    """One dict per token of batch row 0: its position, text, and ``[feature, value]`` pairs."""
    indices, values = record.indices[0].tolist(), record.values[0].float().tolist()
    return [
        {"position": p, "token": token, "features": [[i, v] for i, v in zip(indices[p], values[p], strict=True) if i >= 0]}
        for p, token in enumerate(tokens)
    ]


def _feature_table(rows: list[dict[str, object]]) -> str:
    """The rows as aligned text: position, token, then ``feature=value`` columns."""
    cells = [[str(r["position"]), repr(r["token"]), *(f"{i}={v:.3f}" for i, v in r["features"])] for r in rows]
    header = ["pos", "token", *(f"#{n + 1}" for n in range(max(len(c) for c in cells) - 2))]
    table = [header, *cells]
    widths = [max(len(row[c]) for row in table if c < len(row)) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip() for row in table)


def _steered_from(args: argparse.Namespace, max_top_k: int = 16) -> tuple[sc.SteeredModel, dict[str, sc.SAE], sc.Steering | None]:
    """The steered model, its SAEs by site, and the steering the flags describe."""
    # The small inputs are read first, so a bad path or flag fails before the model loads.
    vectors = [sc.AddVector(site, _load_vector(file), scale) for site, file, scale in args.add_vector]
    sae_edits = [*args.clamp, *args.reconstruct]
    given = list(args.steer.edits) if args.steer is not None else []
    saes = {} if args.sae is None else _place_sae(args.sae, sae_edits, args.device)
    if sae_edits and not saes:
        raise ValueError("--clamp and --reconstruct edit SAE features, so they need --sae PATH.")
    model = _load_model(args.model).to(args.device)
    edits = [*vectors, *sae_edits, *given]
    # An SAE's site takes vectors too; steer() only needs the sites that have no SAE.
    additive = list(dict.fromkeys(e.site for e in edits if isinstance(e, sc.AddVector) and e.site not in saes))
    steered = sc.steer(model, saes, sites=additive, backend=args.backend, max_top_k=max(16, max_top_k))
    tokens = args.steer.tokens if args.steer is not None and not (vectors or sae_edits) else args.tokens
    return steered, saes, sc.Steering(*edits, tokens=tokens) if edits else None


def _place_sae(path: str, sae_edits: list[sc.Clamp | sc.Reconstruct], device: str) -> dict[str, sc.SAE]:
    """``{site: SAE}``: the SAE goes to its ``hook_name``, else to the site of the first SAE edit."""
    sae = sc.SAE.load(path, device=device)  # detects the format; a bad path is a ValueError naming it
    site = sae.hook_name or (sae_edits[0].site if sae_edits else None)
    if site is None:
        raise ValueError(
            f"the SAE at {path} does not say which site it was trained on (no hook_name); "
            "name one with a --clamp or --reconstruct."
        )
    return {site: sae}


def _serve(args: argparse.Namespace) -> int:
    # Engines plug in through an entry point, so the CLI never imports an integration itself.
    engines = {entry.name: entry for entry in importlib.metadata.entry_points(group="sae_compile.serve")}
    if "vllm" not in engines:
        raise ValueError('serving needs the vLLM integration: pip install "sae-compile[vllm]"')
    try:
        serve = engines["vllm"].load()
    except ImportError as err:
        raise ValueError(str(err)) from err
    return serve(args.model, dict(args.sae), args.site, args.max_clamps, args.max_top_k, args.passthrough)


def _bench(args: argparse.Namespace) -> int:
    if not args.script.is_file():
        raise FileNotFoundError(
            f"benchmark script {args.script} not found. `sae-compile bench` runs the benchmarks of a "
            "source checkout; clone the repository and run it there."
        )
    return subprocess.run([sys.executable, str(args.script), *args.passthrough], check=False).returncode


def _load_model(path: str) -> torch.nn.Module:
    """The causal LM in the local checkpoint directory ``path``, in eval mode."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint directory (no config.json there).")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for errors: each must be one line
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def _load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_vector(file: Path) -> torch.Tensor:
    """The 1-D vector stored in ``file`` (.pt/.pth via weights-only torch.load, .safetensors, .npy)."""
    if not file.is_file():
        raise FileNotFoundError(f"vector file {file} not found.")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(file, allow_pickle=False))
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
        if len(tensors) != 1:
            raise ValueError(f"{file} holds {len(tensors)} tensors ({', '.join(tensors)}); --add-vector needs exactly one.")
        return next(iter(tensors.values()))
    if suffix in (".pt", ".pth"):
        vector = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(vector, torch.Tensor):
            raise ValueError(f"{file} holds a {type(vector).__name__}, not a tensor; --add-vector needs a 1-D tensor.")
        return vector
    raise ValueError(f"{file}: unsupported vector file type {suffix!r}; use .pt, .pth, .safetensors or .npy.")


if __name__ == "__main__":
    sys.exit(main())
