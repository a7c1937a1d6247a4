#!/usr/bin/env bash
# `flatcli rank` on a real sweep (docs/experiments.md, "Ranking a sweep"): one-hidden-layer MLPs
# on the bundled mnist5k, trained with `flatcli train` over a full 2 x 2 x 2 grid of
#   width (hidden units 32 / 256), batch size (32 / 512), random-label fraction (0 / 0.2),
# SGD (momentum 0.9, lr 0.05), 40 epochs, seed 0; then one `flatcli rank` over the folder with
# gamma_hat, normalized sharpness, the Hessian trace, the top eigenvalue, eps- and adaptive
# sharpness and the PAC-Bayes bound, each on 1,000 of the training digits exactly as trained on
# (--split trained: with their random labels). MEASURES=a,b,... picks other metrics.
# Rerunning skips the checkpoints that exist and reuses the rank cache.
# Run from the repository root: bash experiments/rank_sweep.sh [OUTDIR]
set -euo pipefail
OUT=${1:-runs/rank}
PYTHON=${PYTHON:-python}
FLATCLI="$PYTHON -m flatcli"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$OUT"
for w in 32 256; do
  cat > "$OUT/mlp$w.yaml" <<YAML
arch: mlp
kwargs:
  hidden: [$w]
YAML
done
for w in 32 256; do
  for b in 32 512; do
    for r in 0.0 0.2; do
      ckpt="$OUT/w$w-b$b-r$r.safetensors"
      [ -f "$ckpt" ] && continue
      $FLATCLI train --model "$OUT/mlp$w.yaml" --dataset mnist5k --optimizer sgd --lr 0.05 \
        --batch-size "$b" --random-labels "$r" --epochs 40 --seed 0 --quiet -o "$ckpt"
    done
  done
done
[ "${TRAIN_ONLY:-0}" = 1 ] && exit 0
MEASURES=${MEASURES:-gamma_hat,normalized_sharpness,hessian_trace,top_eigenvalue,eps_sharpness,adaptive_sharpness,bound}
$FLATCLI rank "$OUT" --measures "$MEASURES" --split trained --max-examples 1000 \
  --cache-dir "$OUT/.rank-cache" --json "$OUT/rank.json" --plot "$OUT/plots"
