#!/usr/bin/env bash
# Jia & Su 2020, §7.2.2 / Table 2 at bundled-data scale: LeNet-5 on 2,000 mnist5k training
# images (`--train-subset 2000`, as the confusion-set experiment) trained with and
# without the Fisher-trace regulariser (Algorithm 1), with the paper's optimiser settings for
# its plain CNN (Appendix E: SGD, Nesterov momentum 0.9, batch 128, lr 0.01 divided by 10 at
# half and three quarters of training, L2 1e-4), alpha = 1e-4, beta = 100 and M = 8 from the
# paper's grids (beta in {10..125}, M in {4, 8, 16}), and the gradient clipping the paper calls
# necessary (tau = 5, from its grid {1, 5, 10, 15}) in BOTH arms, so that the regulariser is the
# only difference. Scaled: 60 epochs (milestones 30, 45) instead of 200, three seeds instead of
# five. Then gamma-hat and the Gram traces (`flatcli gamma`, the 2,000 training images), the
# Hessian trace and top eigenvalue (`flatcli spectrum --trace`, 1,000 of them, 30 products),
# and a table.
# Run from the repository root: bash experiments/fisher_reg.sh [OUTDIR] [EPOCHS] [SEEDS...]
set -euo pipefail
OUT=${1:-runs/fisher-reg}
EPOCHS=${2:-60}
shift $(( $# > 2 ? 2 : $# ))
SEEDS=${*:-0 1 2}
PYTHON=${PYTHON:-python}
FLATCLI="$PYTHON -m flatcli"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
M1=$(( EPOCHS / 2 ))
M2=$(( EPOCHS * 3 / 4 ))
COMMON=(--model lenet5 --dataset mnist5k --train-subset 2000 --optimizer sgd --lr 0.01 --momentum 0.9 --nesterov
  --weight-decay 1e-4 --batch-size 128 --epochs "$EPOCHS" --schedule step
  --milestones "$M1,$M2" --clip 5 --quiet)
for seed in $SEEDS; do
  [ -f "$OUT/plain-s$seed.safetensors" ] || $FLATCLI train "${COMMON[@]}" --seed "$seed" \
    -o "$OUT/plain-s$seed.safetensors" --json "$OUT/train-plain-s$seed.json"
  [ -f "$OUT/reg-s$seed.safetensors" ] || $FLATCLI train "${COMMON[@]}" --seed "$seed" \
    --fisher-reg --reg-beta 100 --reg-alpha 1e-4 --reg-subbatches 8 \
    -o "$OUT/reg-s$seed.safetensors" --json "$OUT/train-reg-s$seed.json"
done
$FLATCLI gamma "$OUT" --split trained --quiet --json "$OUT/gamma.json"
$FLATCLI spectrum "$OUT" --split trained --max-examples 1000 --top-k 1 --trace --probes 30 \
  --quiet --json "$OUT/spectrum.json"
$PYTHON experiments/fisher_reg_table.py "$OUT/gamma.json" "$OUT/spectrum.json"
