#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA device, install the `gpu` extra and torch, run the CUDA
# tests, and print candidate throughput through shadowlens next to raw onnxruntime / torch on the
# same model at micro-batch sizes 1..1024 (bench/bench_runners.py; the ratio is the figure).
#
# Usage: bench/gpu_check.sh [--cpu] [--no-install] [--quick]
#
#   (default)     needs a CUDA device: exits 2 at once, saying so, when nvidia-smi finds none or when
#                 onnxruntime or torch cannot run on it
#   --cpu         dry run on CPU: no device needed, nothing installed; the CUDA tests run and skip,
#                 the bench runs on CPU (what tests/test_runner_torch.py checks)
#   --no-install  use the environment as it is (a machine without a package index)
#   --quick       a small model and batches 1, 64, 1024 (seconds, not minutes)
#
# Environment: PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=cuda install=1 quick=()
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu install=0 ;;
    --no-install) install=0 ;;
    --quick) quick=(--quick) ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (--cpu, --no-install, --quick)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

die() { echo "gpu_check: $*" >&2; exit 2; }

if [ "$mode" = cuda ]; then
  command -v nvidia-smi >/dev/null 2>&1 || die "no CUDA device: nvidia-smi is not installed; run this on a GPU machine, or --cpu for the dry run"
  gpus=$(nvidia-smi -L 2>/dev/null | grep '^GPU' || true)
  [ -n "$gpus" ] || die "no CUDA device: nvidia-smi lists none; run this on a GPU machine, or --cpu for the dry run"
  echo "$gpus"
  if [ "$install" = 1 ]; then
    # onnxruntime (a base dependency) and onnxruntime-gpu install the same `onnxruntime` package:
    # remove the CPU one, then (re)install the GPU one so its files are the ones left.
    "$PY" -m pip install -q -e '.[test,torch]'
    "$PY" -m pip uninstall -y -q onnxruntime || true
    "$PY" -m pip install -q --force-reinstall --no-deps onnxruntime-gpu
    "$PY" -m pip install -q -e '.[gpu]'
    "$PY" -m pip uninstall -y -q onnxruntime 2>/dev/null || true  # if '.[gpu]' brought it back
    "$PY" -m pip install -q --force-reinstall --no-deps onnxruntime-gpu
  fi
  "$PY" - <<'EOF' || exit 2
import sys
import numpy as np
import onnxruntime as ort
from streams.replay.runner import choose_providers
problems = []
if "CUDAExecutionProvider" not in ort.get_available_providers():
    problems.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider ({ort.get_available_providers()}): "
                    "pip install onnxruntime-gpu after removing onnxruntime")
else:
    import tempfile, pathlib
    from streams.models import build_digits_models
    from streams.replay.runner import OnnxRunner
    with tempfile.TemporaryDirectory() as tmp:
        runner = OnnxRunner(str(build_digits_models(pathlib.Path(tmp))["good"]))
        if runner.providers[0] != "CUDAExecutionProvider":
            problems.append(f"onnxruntime could not start CUDA (session providers {runner.providers}): CUDA/cuDNN "
                            "libraries missing? pip install 'onnxruntime-gpu[cuda,cudnn]'")
try:
    import torch
    if not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda})")
    else:
        print(f"torch {torch.__version__}: {torch.cuda.get_device_name(0)}")
except ImportError:
    problems.append("torch is not installed: pip install 'shadowlens[torch]'")
print(f"onnxruntime {ort.__version__}: {choose_providers()}")
for p in problems:
    print(f"gpu_check: {p}", file=sys.stderr)
sys.exit(2 if problems else 0)
EOF
else
  echo "gpu_check: dry run on CPU (--cpu): the CUDA tests skip, the bench runs on CPU"
fi

# The CUDA tests: they run where a device is, and skip (cleanly) where none is.
"$PY" -m pytest -q -rs -p no:cacheprovider \
  "tests/test_streams_pipeline.py::test_cuda_provider_is_chosen_and_agrees_with_cpu" \
  tests/test_runner_torch.py -k cuda

"$PY" bench/bench_runners.py --device "$mode" "${quick[@]}"
