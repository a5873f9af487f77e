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
