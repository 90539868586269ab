#!/usr/bin/env bash
# One-shot GPU check on a fresh CUDA machine (H100/H200; torch with CUDA, triton and nvcc
# installed; no internet; this repository copied to the current directory):
#   1. build the extension in place with its CUDA kernels (PARETO_LORA_CUDA=1),
#   2. run the GPU-relevant tests (the rest of the suite is CPU-only and runs in CI),
#   3. one-process NCCL DDP and FSDP2 steps (tools/device_nccl_smoke.py),
#   3b. a LoRA training step of a hidden-2048 Chameleon in bf16 (bench_gpu_step.py, issue 28 §3-4 and
#      issue 26 §1b: vanilla, ParetoLoRA per traversal, MIMO, with and without checkpointing; never
#      run on a GPU before),
#   4. run the GPU benchmark,
#   5. sweep the CUDA launch plans against Triton over sizes and segment counts (sweep_gpu_paths.py),
#   6. split the host time of small calls: Python API, the op, its halves, a torch launch, a pinned
#      upload (host_overhead.py; written 2026-11-28 without a device, run on the CPU only so far).
# PARETO_LORA_DEVICE_STEPS (default "pytest,pytest_shared,nccl,gpustep,rules,sweep,host"; add "bench" for the full
# bench_gpu.py grid with every baseline, ~2 more minutes) picks the steps after the build. Measured
# on an H200 (2026-11-28): build 50-75 s, pytest 55 s, pytest_shared 65 s, nccl 20 s, sweep 40-50 s.
# Every log and table is written to a results folder ($PARETO_LORA_DEVICE_RES, default a fresh
# /tmp/pareto_lora_device.*): environment, build log, pytest logs (junit XML with
# PARETO_LORA_JUNIT=1), benchmark CSV/Markdown/JSON. A lent machine returns at most 8 files from
# $OUT, so after every step the whole folder is packed into $OUT/device_out.tar.gz and
# summary.txt is copied beside it: a run stopped at its time limit still returns every finished
# step. Each step has its own time limit so the whole run stays under ~9 minutes; a step that
# fails or times out is recorded and the next step still runs. Exit status: non-zero if the build
# or the tests failed.
#
#   OUT=/tmp/out bash bench/run_on_device.sh      # then: tar xzf /tmp/out/device_out.tar.gz
set -u -o pipefail

DEST="${OUT:-$PWD/device_out}"
RES="${PARETO_LORA_DEVICE_RES:-$(mktemp -d /tmp/pareto_lora_device.XXXXXX)}"
mkdir -p "$DEST" "$RES"
# The scripts below write to $OUT: point them at the results folder.
export OUT="$RES"
pack() {  # the results folder into one archive in $DEST, and the summary beside it
  tar czf "$DEST/device_out.tar.gz.part" -C "$RES" . && mv -f "$DEST/device_out.tar.gz.part" "$DEST/device_out.tar.gz"
  [ -f "$RES/summary.txt" ] && cp -f "$RES/summary.txt" "$DEST/summary.txt"
  return 0
}
export PARETO_LORA_CUDA=1
# The H200 image builds with /opt/gcc/bin/g++ by default, but torch was built with the system GCC:
# C++ exceptions thrown from an extension built with the other one crash (seen 2026-11-28).
# To be confirmed on the next run: build with the system GCC (torch 2.11 reports GCC 13.3 = /usr/bin/g++).
[ -x /usr/bin/g++ ] && export CC=/usr/bin/gcc CXX=/usr/bin/g++
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Only the local GPU's architecture: a fraction of the all-arch build time.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)"
  export TORCH_CUDA_ARCH_LIST
fi
PY="${PYTHON:-python}"
status=0
SECONDS=0

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s) at ${SECONDS}s: $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after ${SECONDS}s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  pack
  return $rc
}

{
  date -u
  nvidia-smi || true
  nvcc --version || true
  "$PY" -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "hip", torch.version.hip); print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0))'
  "$PY" -c 'import triton; print("triton", triton.__version__)' || true
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CC=${CC:-} CXX=${CXX:-}"
  ${CXX:-c++} --version | head -1
  "$PY" -c 'import torch; print(torch.__config__.show())' | grep -i -m2 "compiler\|gcc"
} >"$OUT/env.txt" 2>&1

if ! step build 200 "$PY" setup.py build_ext --inplace; then
  echo "build failed: see $OUT/build.log" | tee -a "$OUT/summary.txt"
  pack
  exit 1
fi
"$PY" -c 'import pareto_lora, torch; print("backends on cuda:", pareto_lora.available_backends("cuda"))' \
  2>&1 | tee -a "$OUT/summary.txt"

# The GPU-relevant tests first (CUDA and Triton backends, the shared op suites, the reliability and
# property suites); the rest of the suite is CPU-only and runs in CI.
STEPS="${PARETO_LORA_DEVICE_STEPS:-pytest,pytest_shared,nccl,gpustep,rules,sweep,host}"
want() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
JUNIT=()
[ "${PARETO_LORA_JUNIT:-0}" = 1 ] && JUNIT=(--junitxml="$OUT/pytest.xml")
# -v: one line per test as it finishes, so a time limit still leaves the names of failures.
if want pytest; then
  # (test_cuda_emulated.py runs the CUDA kernels on the CPU: CI does that; here the real ones run)
  step pytest "${PARETO_LORA_PYTEST_LIMIT:-150}" "$PY" -m pytest -v --tb=short -rfEs tests/backends \
    --ignore=tests/backends/test_cuda_emulated.py \
    "${JUNIT[@]}" -p no:cacheprovider || status=1
fi
# The shared suites: their CPU parametrisations run in CI, here only the CUDA ones.
if want pytest_shared; then
  step pytest_shared "${PARETO_LORA_PYTEST_SHARED_LIMIT:-120}" "$PY" -m pytest -v --tb=short -rfE -k cuda \
    tests/test_ops.py tests/test_errors.py tests/test_reliability.py tests/test_properties.py \
    tests/test_hypothesis.py tests/test_margin.py tests/test_bench_baselines.py tests/test_family_a.py \
    tests/test_family_b.py tests/test_family_b_guarantees.py -p no:cacheprovider || status=1
  # K objectives: the weightings on the device (same weights as on the CPU, no host sync)
  step pytest_multi 90 "$PY" -m pytest -v --tb=short -rfE tests/multi/test_weightings_device.py -p no:cacheprovider || status=1
fi

# One-process NCCL DDP and FSDP2 steps with ParetoLoRA on a small bf16 model.
want nccl && { step nccl 60 "$PY" tools/device_nccl_smoke.py || status=1; }
# A training step on the GPU (writes gpu_step.md / gpu_step.json): the batch search, 10 rounds at most.
want gpustep && { step gpustep 150 "$PY" bench/bench_gpu_step.py --rounds 10 --max-seconds 45 --max-batch 16 \
  --out "$OUT" || true; }

# The benchmark runs implementation by implementation, so a timeout costs baselines, not the
# fused kernel's rows; the CSV and Markdown table are rewritten after every row.
export PARETO_LORA_BENCH_OUT="$OUT"
if want bench; then
  step bench 120 "$PY" -m pytest -q bench/bench_gpu.py --benchmark-json="$OUT/bench_gpu.json" \
    --benchmark-columns=median,min,max -p no:cacheprovider || true
  [ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
fi
want sweep && { step sweep "${PARETO_LORA_SWEEP_LIMIT:-150}" "$PY" bench/sweep_gpu_paths.py || true; }
want host && { step host 60 "$PY" bench/host_overhead.py --device cuda || true; }
# Every kernel rule in the fused op against `sum` (issue 24), CUDA kernels then Triton.
want rules && { step rules 90 bash -c "\"$PY\" bench/bench_rules.py 1 21 cuda cpp && \"$PY\" bench/bench_rules.py 1 21 cuda triton" || true; }

echo "total ${SECONDS}s, status $status" | tee -a "$OUT/summary.txt"
pack
for f in env.txt gpu_step.md; do [ -f "$RES/$f" ] && cp -f "$RES/$f" "$DEST/"; done
exit $status
