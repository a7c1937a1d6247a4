#!/usr/bin/env bash
# normalized-flat-minima.md §6 at bundled-data scale: an MLP with three hidden layers of 128
# units on mnist5k, Adam lr 1e-3, no regularisation, trained on 0 %, 10 %, ..., 100 % random
# labels (seed 0) until 99 % training accuracy; then one `flatcli sharpness` over the folder,
# measured on exactly the data + labels each checkpoint was trained on (--split trained).
# Run from the repository root: bash experiments/random_labels.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/rl}
PYTHON=${PYTHON:-python}
FLATCLI="$PYTHON -m flatcli"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
cat > "$OUT/mlp3.yaml" <<'YAML'
arch: mlp
kwargs:
  hidden: [128, 128, 128]
YAML
for r in 0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 1.0; do
  [ -f "$OUT/r$r.safetensors" ] && continue
  $FLATCLI train --model "$OUT/mlp3.yaml" --dataset mnist5k --optimizer adam --lr 1e-3 \
    --random-labels "$r" --target-train-acc 0.99 --epochs 400 --seed 0 --quiet \
    -o "$OUT/r$r.safetensors" --json "$OUT/train-r$r.json"
done
$FLATCLI sharpness "$OUT" --split trained \
  --measure normalized_sharpness --measure hessian_trace --json "$OUT/sharpness.json"
$PYTHON experiments/correlate.py "$OUT/sharpness.json"
