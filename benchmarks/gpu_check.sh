#!/usr/bin/env bash
# Everything the GPU issue needs from a session that has a CUDA GPU, in one run (plan ~10 minutes):
# the CUDA tests (graph-replayed training steps and graphed validation against eager ones), the
# suites that touch the step and the bounds, the GPU benchmarks, and a short training run with
# CUDA graphs. Data: SEQVAE_DATA, or data/ (copy binarized_mnist/ and polyphonic/ there; data/ is
# git-ignored, so name it in the device tool's `carry`).
#
#     bash benchmarks/gpu_check.sh [OUT]      # logs under OUT (default gpu_check/)
set -u
out=${1:-gpu_check}
mkdir -p "$out"
export SEQVAE_DATA=${SEQVAE_DATA:-data}
pip install -q -e . > "$out/install.log" 2>&1 || pip install -q --no-deps -e . >> "$out/install.log" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt"
timeout 240 python -m pytest -q -x -p no:cacheprovider -rs tests/test_graphs.py tests/test_static.py tests/test_train.py \
    tests/test_objectives.py 2>&1 | tail -15 | tee "$out/tests.txt"
timeout 180 python benchmarks/bench_train.py --device cuda --repeats 20 2>&1 | tee "$out/bench_train.txt"
timeout 60 python benchmarks/bench_fivo.py --device cuda --repeats 5 2>&1 | tee "$out/bench_fivo.txt"
timeout 120 seqvae train draw --preset paper --train.device=cuda --train.epochs=1 --data.limit=12800 \
    --data.valid_limit=1000 --name gpu-paper --runs-dir "$out/runs" 2>&1 | tail -5 | tee "$out/train.txt"
