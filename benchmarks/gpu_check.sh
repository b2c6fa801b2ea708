#!/usr/bin/env bash
# The GPU check, one script for one GPU, under 5 minutes: (b) and (c) at batch 64 and 1024, eager, then a
# bf16-mixed fit, then (b) and (c) again through torch.compile.
#   bash benchmarks/gpu_check.sh [DATA_DIR]           (default ../shared/datasets)
# Each stage has its own time limit (STAGE_TIMEOUT seconds, default 150), so a slow stage costs only
# itself and the rows printed before it stand; the script exits non-zero if any stage failed.
# DEVICE=cpu EPOCHS=1 FIT_ARGS='--data.val_size 100' run the same path on a CPU (the tests do).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data_dir="$(cd "${1:-$here/../../shared/datasets}" && pwd)" || exit 2
device="${DEVICE:-cuda}"
epochs="${EPOCHS:-5}"
fit_args="${FIT_ARGS:-}"
limit="${STAGE_TIMEOUT:-150}"
accelerator=$([ "$device" = cuda ] && echo gpu || echo cpu)
failed=0

stage() {  # stage TITLE COMMAND...: run one stage under the time limit, note a failure and go on
    echo "## $1"
    shift
    timeout "$limit" "$@" || { echo "stage failed or ran past ${limit}s (exit $?)"; failed=1; }
}

python - <<'PY' || exit 2
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, {gpu}", flush=True)
PY
speed=(python "$here/speed.py" "$data_dir" --device "$device" --epochs "$epochs" --batch-sizes 64 1024 --no-tutorial
    --default-only --fit-args "$fit_args")
stage "eager" "${speed[@]}"

tmp="$(mktemp -d)"
# shellcheck disable=SC2086  # fit_args is a list of options
stage "bf16-mixed, default recipe" bash -c "cd '$tmp' && python -m mnist_lightning.fit --data.data_dir '$data_dir' \
    --trainer.accelerator $accelerator --trainer.devices 1 --trainer.precision bf16-mixed \
    --trainer.max_epochs $epochs $fit_args 2>&1 | tail -n 1"
rm -rf "$tmp"

stage "torch.compile, (b) and (c) (first epoch, which compiles, left out of the loop time)" "${speed[@]}" --compile
exit "$failed"
