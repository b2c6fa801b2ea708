#!/usr/bin/env bash
# The GPU check, one script for one GPU, under 5 minutes: (b) and (c) at batch 64 and 1024, with and
# without torch.compile, then a bf16-mixed fit on the GPU.
#   bash benchmarks/gpu_check.sh [DATA_DIR]           (default ../shared/datasets)
# DEVICE=cpu EPOCHS=1 FIT_ARGS='--data.val_size 100' run the same path on a CPU (the tests do).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data_dir="$(cd "${1:-$here/../../shared/datasets}" && pwd)"
device="${DEVICE:-cuda}"
epochs="${EPOCHS:-5}"
fit_args="${FIT_ARGS:-}"
accelerator=$([ "$device" = cuda ] && echo gpu || echo cpu)

python - <<'PY'
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, {gpu}")
PY
speed=(python "$here/speed.py" "$data_dir" --device "$device" --epochs "$epochs" --batch-sizes 64 1024 --no-tutorial)
echo "## eager"
"${speed[@]}" --fit-args "$fit_args"
echo "## torch.compile (first epoch, which compiles, left out of the loop time)"
"${speed[@]}" --fit-args "$fit_args --model.compile true"

echo "## bf16-mixed, default recipe"
tmp="$(mktemp -d)"
(cd "$tmp" && python -m mnist_lightning.fit --data.data_dir "$data_dir" --trainer.accelerator "$accelerator" \
    --trainer.devices 1 --trainer.precision bf16-mixed --trainer.max_epochs "$epochs" $fit_args 2>&1 | tail -n 1)
rm -rf "$tmp"
