#!/usr/bin/env bash
# Fashion-MNIST accuracy benchmark (AL vs BP, mlp and cnn, 20 epochs, 3 seeds) on one GPU.
# Runs from the repo root on a machine with torch installed; the IDX files under
# $AL_DATASETS_DIR/fashion-mnist. Results land in benchmarks/results/ (and ${OUT:-.}).
set -euo pipefail
# `al bench` is an entry point (pyproject.toml), so the project is installed, editable: no dependencies
# (torch stays as it is) and no build isolation (no package index needed).
python3 -m pip install --quiet --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1 AL_DATASETS_DIR=${AL_DATASETS_DIR:-$PWD/.bench-data}
out=${OUT:-benchmarks/results}
for arch in mlp cnn; do
  python3 -m al.cli bench accuracy --dataset fashion-mnist --arch "$arch" --epochs 20 --seeds 3 \
    --batch-size 128 --device cuda > "$out/accuracy-$arch.log" 2>&1 &
done
wait
cp benchmarks/results/accuracy-fashion-mnist-*.json "$out"/ 2>/dev/null || true
