#!/usr/bin/env bash
# Every GPU check in one go, sized for under 5 minutes on one GPU (nothing to download):
#   1. the CUDA tests (tests/test_cuda.py): one training step of every method in fp32, bf16 and fp16,
#      exact resume in fp16 (loss-scaler state) and bf16, AutoAttack on a few points in fp32, `auto`;
#   2. the train-step benchmark on PreActResNet-18 at batch 512 on random 3x32x32 data: images/s and
#      efficiency per method and precision, beside the plain fp32 loop (benchmarks/plain_loop.py).
# Writes results/gpu_check/{tests.txt,train_step.txt} (or under $OUT when set) and prints both.
#   bash benchmarks/gpu_check.sh            # PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-results/gpu_check}
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # deterministic cuBLAS for the resume test

$PY - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible to torch; nothing to check")
p = torch.cuda.get_device_properties(0)
print(f"# {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}", flush=True)
PYEOF

mkdir -p "$DEST"
status=0
timeout 150 $PY -m pytest tests/test_cuda.py -m cuda -q -rs -p no:cacheprovider 2>&1 | tee "$DEST/tests.txt" \
    || status=$?
timeout 120 $PY benchmarks/train_step.py --device cuda --settings preact --batch-size 512 \
    --precision fp32,bf16,fp16 --methods standard,fgsm,fgsm_rs,n_fgsm,gmr,gradalign \
    --repeats 10 --warmup 3 2>&1 | tee "$DEST/train_step.txt" || status=$?
exit $status
