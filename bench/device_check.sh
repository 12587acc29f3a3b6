#!/usr/bin/env bash
# The GPU check of issue 21 in one run (at most 8 minutes on one H200): the CUDA-marked tests,
# refreshes at 50,000 and 1,280,000 x 512 on the GPU vs the CPU path with their k-NN recall, one
# epoch of `lcc train` (bf16-mixed) with and without LCC, and peak GPU memory, as a markdown
# table (also in $OUT/device_check.md when $OUT is set). See bench/device_check.py.
#
#   bash bench/device_check.sh             # on a GPU machine; a dry run without CUDA
#   bash bench/device_check.sh --small     # tiny sizes (without CUDA: the torch path on CPU)
#   bash bench/device_check.sh --dry-run   # say what it would run
#
# Setup: the device machine's python3 has torch, lightning, scikit-learn, scipy... but not faiss,
# igraph or leidenalg, and cannot reach a registry: their wheels travel in .devcarry/whl
# (an ignored folder: carry it), installed under /tmp/lcc-site in at most 120 s. lcc itself is
# imported from this checkout (PYTHONPATH), with whatever torch is installed: no install that
# could pull another torch. Fashion-MNIST: /usr/share/datasets/fashion-mnist, else the IDX
# files in .devcarry/fashion-mnist, else part (c) says it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import faiss, igraph, leidenalg" 2>/dev/null; then
    if compgen -G ".devcarry/whl/*.whl" >/dev/null; then
        echo "setup: installing the carried wheels (.devcarry/whl) into /tmp/lcc-site"
        timeout 120 python3 -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/lcc-site .devcarry/whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/lcc-site" \
            || echo "setup: the wheels did not install; parts that need them will say so"
    else
        echo "setup: faiss/igraph/leidenalg missing and no .devcarry/whl to install them from"
    fi
fi
if ! python3 -c "import torch, lcc" 2>/dev/null; then
    echo "setup failed: python3 cannot import torch and lcc; install torch, then run"
    echo "  python3 -m pip install -e . (or carry the wheels, see the header of this script)"
    exit 1
fi
exec python3 bench/device_check.py "$@"
