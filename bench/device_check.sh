#!/usr/bin/env bash
# The GPU checks (doctor, the CUDA tests, bench/exam.py), in one run on a lent device machine.
#
# The device machine has CUDA torch, numpy, scipy, numba, h5py and tqdm, but not sigpy
# (the phantoms and ESPIRiT's sigpy variant need it), and nothing can be fetched there.
# Here, once, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl sigpy pywavelets
#
# then through the device tool: command "bash bench/device_check.sh", carry [".whl"],
# timeout_s 600. It writes every log under $OUT (./device-check when OUT is unset), so a
# run cut short still returns what it measured; copy the figures into bench/RESULTS.md
# with the GPU model from machine.txt.
#
# QUICK=1 shrinks every size, to check the script itself on any machine in a minute.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-device-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:$PWD/gadget${PYTHONPATH:+:$PYTHONPATH}"

if [ "${QUICK:-0}" = 1 ]; then
    exam_sizes=(--slice-size 64 --slice-coils 4 --exam-slices 2 --exam-size 64 --exam-coils 4 --set iterations=20)
    slow_iterations=20
else
    exam_sizes=()
    slow_iterations=1000
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    echo "CPU cores: $(nproc)"
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
                "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    python3 -c 'import tinycudann' 2>/dev/null && echo "tinycudann importable" || echo "tinycudann not importable"
} 2>&1 | tee "$out/machine.txt"

# What a reconstruction will run on, with a phantom check: the PyTorch grid, then tiny-cuda-nn's
# where it imports (the default stays the PyTorch grid until the two have matched on a GPU).
timeout 60 python3 -m unrollinr_gadget.cli doctor --device cuda 2>&1 | tee "$out/doctor.log"
timeout 60 python3 -m unrollinr_gadget.cli doctor --device cuda --set encoding_backend=tcnn 2>&1 \
    | tee "$out/doctor_tcnn.log"

# The tests that run on each device (the CUDA ones are skipped without a GPU).
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_sense.py tests/test_column_solve.py \
    tests/test_hashgrid.py tests/test_coils.py tests/test_recon.py tests/test_cg.py 2>&1 | tee "$out/tests.log"

# Target 2: one 368^2 15-coil slice and the 20-slice 384^2 12-coil exam, then the slow
# configuration's PSNR, each under its own time limit so that one overrun keeps the others.
timeout 240 python3 bench/exam.py "${exam_sizes[@]}" --slow-iterations 0 2>&1 | tee "$out/exam.log"
timeout 180 python3 bench/exam.py "${exam_sizes[@]}" --exam-slices 0 --slow-iterations "$slow_iterations" 2>&1 \
    | tee "$out/exam_slow.log"
