#!/usr/bin/env bash
# Issue 27: reflow from the flow teacher, then evaluate both at 1, 2, 4, 20 Euler steps.
cd runs/equal_time
# needs flow/ckpt.pt: train --cond --objective flow --out-dir flow (here)
F=../../vanilla_diffusion.py
D="--data-dir ../../../shared/data"
rm -rf reflow; mkdir -p reflow; cp ../mnist_classifier.pt reflow/ 2>/dev/null || true
/usr/bin/time -f "WALL reflow %e s" python $F train --reflow-from flow/ckpt.pt --pairs 20000 --out-dir reflow > reflow/train.log 2>&1
grep -E "pairs 20,000|WALL|done in" reflow/train.log
for name in flow reflow; do
  python $F evaluate --ckpt $name/ckpt.pt $D --samplers euler:1,euler:2,euler:4,euler:20 --guidance-scales 1.5 > $name/eval.log 2>&1
  echo "== $name"; tail -7 $name/eval.log
done
