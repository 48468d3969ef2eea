#!/usr/bin/env bash
# Issue 33's quality round: each lever trained at the default's budget, one run at a time, then
# judged at 10,000 samples. Run from the repository root; results are appended to
# runs/quality/results.log. About 10 minutes a row on 2 CPU cores.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=runs/quality
mkdir -p "$OUT"
judge() {  # checkpoint folder, evaluate flags, name
  echo "=== $3" >> "$OUT/results.log"
  python vanilla_diffusion.py evaluate --ckpt "$1/ckpt.pt" --data-dir "$DATA" --per-label 1000 \
    $2 | grep -v "^  [a-z]* step \|^  drew " >> "$OUT/results.log"  # not the progress lines
}
BEFORE="--logsnr-mean -2"  # the default of the rows before 2026-12-07 (now −1); a lever's own wins
lever() {  # name, train flags
  /usr/bin/time -f "%e s wall" python vanilla_diffusion.py train --cond --data-dir "$DATA" \
    --out-dir "$OUT/$1" --overwrite $BEFORE $2 2>&1 | tail -2 >> "$OUT/results.log"
  judge "$OUT/$1" "--guidance-scales 1.5" "$1: $2"
}
# the 5-epoch default as shipped until 2026-12-04 (the shipped file is now the 4× model, below)
mkdir -p "$OUT/shipped" && git show 90c1388:assets/models/conditional.pt > "$OUT/shipped/ckpt.pt"
judge "$OUT/shipped" "--guidance-scales 1.25,1.5,2.0" "shipped model, w"
judge "$OUT/shipped" "--guidance-scales 1.5 --guidance-interval 0.1,0.8" "interval 0.1,0.8"
judge "$OUT/shipped" "--guidance-scales 1.5 --guidance-interval 0.0,0.7" "interval 0,0.7"
lever seed1 "--seed 1"
lever beta2 "--adam-beta2 0.99"
lever bs64 "--batch-size 64 --lr 6e-3"
lever lsm1 "--logsnr-mean -1"
judge "$OUT/lsm1" "--guidance-scales 1.5,1.75 --sigma-min 0.1" "lsm1 at sigma-min 0.1"
lever lsm1s1 "--logsnr-mean -1 --seed 1"
lever lss3 "--logsnr-std 3"
lever half "--max-steps 4687"
lever double "--epochs 10"
mkdir -p "$OUT/uncond" && cp assets/models/unconditional.pt "$OUT/uncond/ckpt.pt"
judge "$OUT/uncond" "" "shipped unconditional model"
# The third session's rows: the log-SNR mean on the unconditional model, the EMA's cap, min-SNR-γ
python vanilla_diffusion.py train --data-dir "$DATA" --out-dir "$OUT/uncond_lsm1" --overwrite \
  --logsnr-mean -1 2>&1 | tail -2 >> "$OUT/results.log"
judge "$OUT/uncond_lsm1" "" "uncond_lsm1: --logsnr-mean -1"
lever ema9995 "--ema-decay 0.9995"
lever minsnr5 "--min-snr-gamma 5"
# The fourth session's rows: min-SNR-γ's second seed, half the peak lr, width 96 at equal time
lever minsnr5s1 "--min-snr-gamma 5 --seed 1"
lever lr2e3 "--lr 2e-3"
lever width96 "--width 96 --max-steps 8150"
# The fifth session's rows: two more levers, the 4× point and its guidance scales, 30 evaluations
judge "$OUT/shipped" "--guidance-scales 1.5 --samplers dpm++2m-karras:30" "shipped model, 30 evals"
lever minsnr5lsm1 "--min-snr-gamma 5 --logsnr-mean -1"
lever lr6e3 "--lr 6e-3"
lever quad "--epochs 20"
judge "$OUT/quad" "--guidance-scales 1,1.25,1.3,1.4" "quad: w"
judge "$OUT/quad" "--guidance-scales 1.5 --samplers dpm++2m-karras:30" "quad: 30 evals"
python docs/scripts/ship_checkpoint.py "$OUT/quad/ckpt.pt" assets/models/conditional.pt 1.3
# The sixth session's rows (2026-12-07): the guidance interval on 1× and 4×, and log-SNR mean −1,
# now the conditional default, on two seeds beside the old default's second seed
judge "$OUT/shipped" "--guidance-scales 1.5,1.75,2 --guidance-interval 0.1,0.6" "interval 0.1,0.6"
judge "$OUT/shipped" "--guidance-scales 1.75,2,2.5 --guidance-interval 0.1,0.5" "interval 0.1,0.5"
judge "$OUT/quad" "--guidance-scales 1.4,1.5 --guidance-interval 0.1,0.5" "quad: interval 0.1,0.5"
judge "$OUT/quad" "--guidance-scales 1.4 --guidance-interval 0.1,0.6" "quad: interval 0.1,0.6"
BEFORE=""
lever default "--seed 0"
lever defaults1 "--seed 1"
lever lsm2s1 "--logsnr-mean -2 --seed 1"
judge "$OUT/default" "--guidance-scales 1.4,1.6" "the new default: w"
judge "$OUT/uncond" "--guidance-scales 4,5" "shipped unconditional model: w"
lever ld2 "--label-drop 0.2"
lever ld05 "--label-drop 0.05"
