#!/usr/bin/env bash
# The device check left for issue 3: on a machine with CUDA, time HVPs and blocks of 16
# (vmapped in chunks of 1, 4, 16) by each method, on random data and on the MNIST
# subset when it is there, so that AUTO_METHOD["cuda"] and the CUDA chunk in
# memory_bounded (flatcli/curvature/operator.py) can be set from measurements.
#   bash bench/gpu_check.sh [DEVICE]        # DEVICE defaults to cuda (cpu works too)
# ~1-2 min on a GPU. Prints what it measured and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cuda}"
python -c "import torch, sys; d = sys.argv[1]; assert d != 'cuda' or torch.cuda.is_available(), 'no CUDA'; \
print(torch.__version__, torch.cuda.get_device_name(0) if d == 'cuda' else 'cpu')" "$device"
for n in 4000 50000; do
    python bench/hvp_methods.py --device "$device" --n "$n" --k 16 --chunks 1,4,16 --repeats 11
done
if [ -d ../shared/data/mnist5k/MNIST/raw ]; then
    python bench/hvp_methods.py --device "$device" --data-dir ../shared/data/mnist5k --n 4000 --k 16 \
        --chunks 1,4,16 --repeats 11
fi
# Every CUDA path of the commands once, end to end (issues 8, 9, 13): train (plain and with
# averaging), sharpness of every measure in float32 (Lanczos bounds re-checked in float64),
# BatchNorm in batch and full mode, per layer, --exact, rank-bound, compare, the Python API
# over a DataLoader; each prints its seconds so the CUDA defaults can be read off.
tmp="$(mktemp -d)"
F="python -m flatcli"
for spec in "cnn-sgd:--model cnn" "cnn-gadam:--model cnn --recipe gadam"; do
    name="${spec%%:*}"; args="${spec#*:}"
    /usr/bin/time -f "train $name %e s" $F train $args --epochs 3 --device "$device" --out "$tmp/$name" --json >/dev/null
done
for mode in eval batch full; do
    /usr/bin/time -f "sharpness bn-mode $mode %e s" $F sharpness "$tmp/cnn-sgd" --device "$device" --bn-mode "$mode" \
        --measures lambda_max,lambda_min,trace,frobenius,density --no-cache --json \
        | python -c "import json,sys; d=json.load(sys.stdin); print({k: d[k] for k in ('bn_mode','bn_batch_size','device','hvps','seconds')}, 'lambda_max', d['lambda_max'])"
done
/usr/bin/time -f "sharpness per-layer %e s" $F sharpness "$tmp/cnn-sgd" --device "$device" --per-layer --measures lambda_max,trace --no-cache --json >/dev/null
$F train --model logreg --epochs 2 --device "$device" --out "$tmp/logreg" --json >/dev/null
/usr/bin/time -f "sharpness --exact %e s" $F sharpness "$tmp/logreg" --device "$device" --exact --dtype float64 --no-cache --json >/dev/null
/usr/bin/time -f "rank-bound %e s" $F rank-bound "$tmp/cnn-sgd" --device "$device" --json >/dev/null
/usr/bin/time -f "compare %e s" $F compare "$tmp/cnn-sgd" "$tmp/cnn-gadam" --device "$device" --json >/dev/null
python - "$device" <<'PY'
import sys, time, torch, flatcli
from torch.utils.data import DataLoader, TensorDataset
device = sys.argv[1]
x, y = flatcli.load_dataset("digits", "train").tensors
model = flatcli.build_model("cnn", input_shape=(1, 8, 8), num_classes=10).to(device)
t0 = time.perf_counter()
a = flatcli.sharpness(model, DataLoader(TensorDataset(x, y), batch_size=256), measures="lambda_max,trace", dtype="float64")
b = flatcli.sharpness(model, (x, y), measures="lambda_max,trace", dtype="float64", batch_size=256)
print("API DataLoader vs tensors on", device, a.measures["lambda_max"].value, b.measures["lambda_max"].value,
      f"{time.perf_counter() - t0:.1f} s")
PY
rm -rf "$tmp"
# The paper's scale (issue 12): VGG-16 and PreResNet-110 (random weights) on 50,000 random
# CIFAR-shaped inputs: seconds per training epoch, per HVP, lambda_max (20 Lanczos steps),
# peak GPU memory, against PyHessian on the same model and data (bench/paper_scale.py).
# About 5-10 min on a recent GPU; --n shrinks it.
python bench/paper_scale.py --device "$device" --n "${PAPER_SCALE_N:-50000}"
