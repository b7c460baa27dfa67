#!/usr/bin/env bash
# GPU figures on a lent GPU machine: (1) raw and (2) end-to-end throughput for ViT-B-32 and
# ViT-L-14 at the measured best batch, with GPU memory and utilisation during (2); and (8), PyTorch
# against ONNX Runtime on that machine's CPU cores. Prepare with bench/gpu_wheels.sh here, then run
# through the device tool:
#     command: bash bench/gpu_check.sh [CHECK...]     carry: [".whl", ".gpu-photos"]     timeout_s: 590
# CHECK: b32, b32-nvjpeg, l14 (GPU), runtimes (ViT-B-32 and ViT-L-14 on the CPU cores). Default: all,
# about 15 minutes; pick what fits the lease. The runtimes check alone may travel with the smaller
# ".whl-runtimes" in place of ".whl" and ".gpu-photos" (it generates its photos).
# Results come back as $OUT/RESULTS-gpu-<name>.md.
set -uo pipefail
wheels=(.whl/*.whl) && [ -e "${wheels[0]}" ] || wheels=(.whl-runtimes/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 1
export PYTHONPATH="/tmp/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 IMGEMBED_DATA_DIR=/tmp/imgembed
OUT="${OUT:-/tmp/imgembed-gpu}" && mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
nproc
bench() {  # seconds, name, then bench arguments
    timeout "$1" python3 -m imgembed bench --photos .gpu-photos --out "$OUT/RESULTS-gpu-$2.md" "${@:3}" \
        2>&1 | grep -v -e ' INFO ' -e '^ ' | tail -20
}
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(runtimes b32 b32-nvjpeg l14)
for check in "${checks[@]}"; do
    case "$check" in
        runtimes) for model_and_seconds in ViT-B-32:220 ViT-L-14:340; do
                      model="${model_and_seconds%:*}"
                      IMGEMBED_DEVICE=cpu timeout "${model_and_seconds#*:}" python3 -m imgembed.bench.runtimes \
                          --model "$model" --out "$OUT/RESULTS-cpu-runtimes-$model.md" 2>&1 \
                          | grep -v -e ' INFO ' -e '^ ' | tail -8
                  done ;;
        b32) bench 190 ViT-B-32 --device cuda --model ViT-B-32 --figures 1,2 ;;
        b32-nvjpeg) (export IMGEMBED_JPEG_DECODE=device; bench 100 ViT-B-32-nvjpeg --device cuda --model ViT-B-32 --figures 2) ;;
        l14) bench 230 ViT-L-14 --device cuda --model ViT-L-14 --figures 1,2 ;;
        *) echo "unknown check $check" ;;
    esac
done
