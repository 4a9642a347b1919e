#!/usr/bin/env bash
# GPU numbers for docs/pretrain.md (run on a CUDA machine from the repo root; $OUT = where logs go).
# Needs alssl's dependencies; on the lent machine they come as wheels in .whl/ and the data in .devdata/.
# 1. bench/pretrain_throughput.py on the GPU: the small cnn (fp32, bs 256) and the CIFAR-stem ResNet-18 (bf16, bs 512),
#    alssl vs lightly's example loop (DataLoader with 8 workers), interleaved rounds.
# 2. SimSiam ResNet-18 (CIFAR stem) on cifar10_10k with bf16 autocast, as many epochs as fit in ~200 s at the
#    measured speed, kNN monitor every 10 epochs.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
D=${DATA:-.devdata/cifar10_10k.npz}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, kornia, lightly, faiss, timm; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
timeout 110 python3 bench/pretrain_throughput.py --device cuda --data "$D" --steps 20 --rounds 3 --workers 8 2>&1 | tee "$OUT/bench_cnn.txt"
timeout 150 python3 bench/pretrain_throughput.py --device cuda --data "$D" --backbone resnet18 --batch-size 512 --steps 15 \
  --rounds 3 --workers 8 --precision bf16-mixed 2>&1 | tee "$OUT/bench_r18.txt"
RATE=$(grep -o 'alssl *[0-9.]* img/s' "$OUT/bench_r18.txt" | awk '{print $2}' | sort -n | tail -1)
EPOCHS=$(python3 -c "r=float('${RATE:-2000}'); print(max(5, min(200, int(200 * r / 10000 / 1.15))))")
echo "SimSiam ResNet-18 bf16: $EPOCHS epochs at ~${RATE} img/s" | tee "$OUT/r18.txt"
START=$(date +%s); python3 -m alssl pretrain --data "$D" --out /tmp/r18 --backbone resnet18 --method simsiam --epochs "$EPOCHS" \
  --batch-size 512 --precision bf16-mixed --accelerator cuda --knn-every 10 -q 2>&1 | tail -30 | tee -a "$OUT/r18.txt"; echo "wall $(( $(date +%s) - START )) s" | tee -a "$OUT/r18.txt"
cp /tmp/r18/metrics.jsonl "$OUT/r18_metrics.jsonl" 2>/dev/null
