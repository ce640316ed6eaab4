#!/usr/bin/env bash
# Issue 13's GPU checks in one call, each step under its own timeout (benchmarks/README.md):
#
#   env         versions, the GPU, the commit (when .git is there)
#   tests       the `gpu`-marked tests
#   probe-fp32  bench_probe on CUDA in float32 (with its precision section)
#   probe-bf16  bench_probe on CUDA in bfloat16
#   overhead    bench_overhead on configs/overhead-100m-bf16.yaml (~100M parameters, bf16-true)
#
# Every JSON and the log (gpu_checks.log) go to ${OUT:-benchmarks/results}: on a device machine
# $OUT is the folder that comes back. A failed or timed-out step does not stop the next ones; the
# script exits 1 at the end if any failed. The timeouts add up to 8.5 minutes; the run is
# expected to take ~5.
#
#   bash benchmarks/gpu_checks.sh                     # on a machine with CUDA
#   bash benchmarks/gpu_checks.sh --steps overhead    # a rerun of some steps (comma-separated)
#   OUT=/tmp/q bash benchmarks/gpu_checks.sh --quick  # the same steps at toy sizes on the CPU
#
# PYTHON picks the interpreter (default python3). Where `datasets` is missing (the device image
# lacks it) and a folder .whl/ is at the repository root, its wheels are installed to /tmp/site
# first (benchmarks/README.md says how to fetch them).
set -euo pipefail

ALL_STEPS="env,tests,probe-fp32,probe-bf16,overhead"
quick=0
steps=$ALL_STEPS
while (($#)); do
    case $1 in
        --quick) quick=1 ;;
        --steps)
            steps=${2:?--steps needs a comma-separated list of: $ALL_STEPS}
            shift
            ;;
        -h | --help)
            sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_checks.sh: unknown argument '$1'; use --quick, --steps $ALL_STEPS or --help" >&2
            exit 2
            ;;
    esac
    shift
done
for step in ${steps//,/ }; do
    if [[ ",$ALL_STEPS," != *",$step,"* ]]; then
        echo "gpu_checks.sh: --steps: unknown step '$step'; the steps are $ALL_STEPS" >&2
        exit 2
    fi
done

here=$PWD
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/benchmarks/results}
[[ $out == /* ]] || out=$here/$out # a relative OUT is the caller's, not the repository root's
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ((quick)); then log=$out/gpu_checks-quick.log; else log=$out/gpu_checks.log; fi
exec > >(tee -a "$log") 2>&1

if ! "$python" -c "import datasets" 2>/dev/null && [[ -d .whl ]]; then
    echo "== installing the carried wheels (.whl/) to /tmp/site"
    # A failed install stops nothing: the probe steps need no datasets, the others then fail.
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "== the wheels did not install: see above"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if ((quick)); then
    # Toy sizes on the CPU: proves the steps and their flags run; the numbers mean nothing.
    device=cpu
    limits=(60 300 300 300 600)
    probe_flags=(--quick)
    overhead_flags=(--quick)
    kind=quick-
else
    device=cuda
    # Seconds per step, in the order of ALL_STEPS: 510 s in all, under a device call's 10 min.
    limits=(30 75 105 90 210)
    # bench_probe's matrix, with the sizes at which a GPU does more than launch kernels: 12x768
    # (GPT-2 small's shape, the issue's targets) and 24x1024 (GPT-2 medium's) instead of the
    # CPU table's 4x256, which an H100 runs in launch overhead alone. Everything else is the
    # full default (2 archs x 16/64 pairs x 10/128 tokens, region maps at grid 37): ~900 TFLOP
    # of timed calls (18 s in fp32, 2 s in bf16 on an H100) and ~2,500 launch-bound forwards,
    # ~1 minute per dtype (benchmarks/README.md). No quiet wait: the machine is ours alone.
    probe_flags=(--sizes 12x768,24x1024 --quiet-wait-s 0)
    overhead_flags=()
    kind=
fi

failed=()
step_index=0
run() { # run STEP COMMAND...: the step under its timeout, if --steps has it
    local name=$1 limit=${limits[$step_index]} started=$SECONDS rc=0
    shift
    step_index=$((step_index + 1))
    [[ ",$steps," == *",$name,"* ]] || return 0
    echo "== $name (timeout ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    if ((rc == 124)); then
        echo "== $name: TIMED OUT after $((SECONDS - started)) s"
    else
        echo "== $name: exit $rc after $((SECONDS - started)) s"
    fi
    ((rc == 0)) || failed+=("$name")
}

env_report() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    git -C "$root" rev-parse HEAD 2>/dev/null || echo "commit: no .git here (a device's copy): the HEAD the call sent"
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    "$python" - "$device" <<'PY'
import importlib.metadata as meta
import sys

import torch

device = torch.device(sys.argv[1])
for name in ("torch", "transformers", "lightning", "accelerate", "datasets", "pyarrow", "numpy"):
    try:
        print(f"{name} {meta.version(name)}")
    except meta.PackageNotFoundError:
        print(f"{name} MISSING")
print(f"python {sys.version.split()[0]}; {torch.get_num_threads()} threads; device {device}")
if device.type == "cuda":
    print(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device))
PY
}

# The device as a file-name part (harness.device_tag), and no further without CUDA where it is due.
tag=$("$python" -c "
import sys, torch
sys.path.insert(0, 'benchmarks')
from harness import device_tag
if '$device' == 'cuda' and not torch.cuda.is_available():
    sys.exit('gpu_checks.sh: no CUDA here; bash benchmarks/gpu_checks.sh --quick runs on the CPU')
print(device_tag(torch.device('$device')))")
echo "== gpu_checks.sh (quick=$quick) --steps $steps -> $out, device $device ($tag)"

export -f env_report
export python device root
run env bash -c env_report
run tests "$python" -m pytest -m gpu -q -rA -p no:cacheprovider
run probe-fp32 "$python" benchmarks/bench_probe.py "${probe_flags[@]}" --device "$device" \
    --dtype float32 --out "$out/bench_probe-$kind$tag-fp32.json"
# The precision section (fp32 numerics of bf16 weights) runs once, in the fp32 run above.
run probe-bf16 "$python" benchmarks/bench_probe.py "${probe_flags[@]}" --device "$device" \
    --dtype bfloat16 --precision-sizes= --out "$out/bench_probe-$kind$tag-bf16.json"
run overhead "$python" benchmarks/bench_overhead.py "${overhead_flags[@]}" \
    --config configs/overhead-100m-bf16.yaml --out "$out/bench_overhead-${kind}100m-bf16-$tag.json"

echo "== files in $out:"
ls -l "$out"
if ((${#failed[@]})); then
    echo "== FAILED: ${failed[*]}"
    exit 1
fi
echo "== all steps passed"
