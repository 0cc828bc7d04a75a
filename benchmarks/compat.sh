#!/usr/bin/env bash
# Does sae_compile work with a given torch / transformers pair? Builds (once, cached) a venv
# with exactly that pair, installs this checkout into it with --no-deps, and runs the
# architecture tests plus a core subset (the op, the steering runtime, generation, site
# discovery, handles). Not part of the default test tier: other torch versions are CUDA
# wheels of several GB.
#
#   benchmarks/compat.sh TORCH TRANSFORMERS          one pair, e.g. 2.15.0 5.24.0
#   benchmarks/compat.sh --matrix T:X [T:X ...]      several pairs, then --report
#   benchmarks/compat.sh --report T:X [T:X ...]      benchmarks/results/compat.{json,md} from runs done
#
# Environment:
#   SAE_COMPILE_COMPAT_DIR  where the venvs live (default /tmp/sae_compile_compat)
#   PYTHON                  interpreter the venvs are made from (default python3)
#   COMPAT_TESTS            test files to run instead of the default subset
#   COMPAT_LOCK             a lock file; if set, only the pytest run holds it (flock), so
#                           installs can overlap other work on a shared machine
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${SAE_COMPILE_COMPAT_DIR:-/tmp/sae_compile_compat}"
python="${PYTHON:-python3}"
# The subset that proves the contract on a version pair in about two minutes on 2 CPU cores:
# every hand-built architecture against the eager reference, the custom op, the steering
# runtime (no recompiles, caches, padding), generate(), site discovery and handles.
read -r -a tests <<<"${COMPAT_TESTS:-tests/test_architectures.py tests/test_op.py tests/test_steering_runtime.py tests/test_generate.py tests/test_sites.py tests/test_handles.py}"

# The pair is pinned exactly, so a constraints file from pip's configuration (some machines
# cap torch that way) could only veto it. An empty file replaces it; this needs no root.
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
venv_of() { echo "$cache/py$pyver-torch$1-transformers$2"; }

# One pair: install if needed, run the tests, write result.json next to the venv, print the
# summary line, and exit with pytest's status.
run_pair() {
    local torch_v="$1" tf_v="$2" venv t0 install_s=0 rc=0
    venv="$(venv_of "$torch_v" "$tf_v")"
    t0=$SECONDS
    if [[ ! -f "$venv/.ready" ]]; then
        # A half-built venv (an interrupted download) is rebuilt, never reused.
        rm -rf "$venv"
        "$python" -m venv "$venv"
        # --no-cache-dir: the CUDA wheels are GB each and live in the venv anyway.
        "$venv/bin/pip" install -q --no-cache-dir "torch==$torch_v" "transformers==$tf_v" \
            "safetensors>=0.4" numpy "pytest>=8" "hypothesis>=6.100"
        # --no-deps: the package's own ranges must not move the pair.
        "$venv/bin/pip" install -q --no-deps -e "$repo"
        touch "$venv/.ready"
        install_s=$((SECONDS - t0))
    fi
    "$venv/bin/python" -c 'import sys, torch, transformers
print(f"compat: python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}")'

    local lock=()
    [[ -n "${COMPAT_LOCK:-}" ]] && lock=(flock "$COMPAT_LOCK")
    t0=$SECONDS
    # Inductor's cache lives with the venv so versions never share compiled artifacts.
    (cd "$repo" && TORCHINDUCTOR_CACHE_DIR="$venv/inductor-cache" "${lock[@]}" \
        "$venv/bin/python" -m pytest -q -rfE --tb=short -p no:logging -p no:cacheprovider --junitxml="$venv/junit.xml" "${tests[@]}") || rc=$?
    local test_s=$((SECONDS - t0))

    "$venv/bin/python" - "$venv" "$torch_v" "$tf_v" "$install_s" "$test_s" "$rc" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
import torch, transformers
venv, torch_v, tf_v, install_s, test_s, rc = sys.argv[1:]
res = {"torch": torch_v, "transformers": tf_v, "python": sys.version.split()[0],
       "torch_build": torch.__version__, "cuda": torch.version.cuda, "pytest_rc": int(rc),
       "install_s": int(install_s), "test_s": int(test_s),
       "passed": 0, "failed": 0, "skipped": 0, "failures": []}
try:
    root = ET.parse(f"{venv}/junit.xml").getroot()
    cases = list(root.iter("testcase"))
    # pytest's own time, without a wait for COMPAT_LOCK.
    res["pytest_s"] = round(float(next(root.iter("testsuite")).get("time", 0)), 1)
except (OSError, ET.ParseError, StopIteration):
    cases = []  # pytest died before writing it: counted by pytest_rc alone
for case in cases:
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    if bad is not None:
        res["failed"] += 1
        cause = (bad.get("message") or "").strip().splitlines() or [""]
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        res["failures"].append({"test": test, "cause": cause[0][:200]})
    elif case.find("skipped") is not None:
        res["skipped"] += 1
    else:
        res["passed"] += 1
if int(rc) not in (0, 1) and not res["failed"]:
    res["failed"] = 1  # a collection or internal error with no failed case to show for it
    res["failures"].append({"test": "(pytest)", "cause": f"pytest exited with status {rc}"})
json.dump(res, open(f"{venv}/result.json", "w"), indent=1)
print(f"compat: torch {torch_v} transformers {tf_v}: {res['passed']} passed, {res['failed']} failed"
      f" ({res['skipped']} skipped; pytest {res.get('pytest_s', '?')} s, install {install_s} s)")
EOF
    return "$rc"
}

# The measured matrix from each pair's result.json, for benchmarks/results/.
report() {
    local files=() p
    for p in "$@"; do files+=("$(venv_of "${p%%:*}" "${p#*:}")/result.json"); done
    "$python" - "$repo/benchmarks/results" "${files[@]}" <<'EOF'
import json, os, platform, sys
out, files = sys.argv[1], sys.argv[2:]
rows = [json.load(open(f)) for f in files if os.path.exists(f)]
missing = [f for f in files if not os.path.exists(f)]
json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used", "pairs": rows},
          open(f"{out}/compat.json", "w"), indent=1)
lines = ["# Tested versions", "",
         "Written by `benchmarks/compat.sh --report`; the notes below the marker are kept.", "",
         "| torch | transformers | python | passed | failed | skipped | pytest (s) | install (s) |",
         "|---|---|---|---|---|---|---|---|"]
lines += [f"| {r['torch']} | {r['transformers']} | {r['python']} | {r['passed']} | {r['failed']} "
          f"| {r['skipped']} | {r.get('pytest_s', '')} | {r['install_s']} |" for r in rows]
for r in rows:
    causes = {}
    for f in r["failures"]:
        causes.setdefault(f["cause"], []).append(f["test"])
    if causes:
        lines += ["", f"Failures on torch {r['torch']} / transformers {r['transformers']}:", ""]
    for cause, tests in sorted(causes.items(), key=lambda c: -len(c[1])):
        more = f" and {len(tests) - 3} more" if len(tests) > 3 else ""
        lines.append(f"- {len(tests)} × {cause}: " + ", ".join(f"`{t}`" for t in tests[:3]) + more)
# Hand-written notes (what each failure means) survive a rerun below this marker.
marker, notes = "<!-- notes: kept by --report -->", ""
if os.path.exists(f"{out}/compat.md"):
    old = open(f"{out}/compat.md").read()
    notes = old[old.index(marker) + len(marker):] if marker in old else ""
open(f"{out}/compat.md", "w").write("\n".join(lines) + "\n\n" + marker + (notes or "\n"))
print(f"wrote {out}/compat.json and compat.md ({len(rows)} pairs)")
if missing:
    sys.exit(f"no result for: {' '.join(missing)}")
EOF
}

case "${1:-}" in
    --matrix | --report)
        mode="$1"
        shift
        [[ $# -gt 0 ]] || usage
        failed=0
        if [[ "$mode" == --matrix ]]; then
            # Each pair in its own process: set -e stays in force inside it.
            for p in "$@"; do "$0" "${p%%:*}" "${p#*:}" || failed=1; done
        fi
        report "$@"
        exit "$failed"
        ;;
    -h | --help | "") usage ;;
    *)
        [[ $# -eq 2 ]] || usage
        run_pair "$1" "$2"
        ;;
esac
