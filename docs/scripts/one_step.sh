#!/usr/bin/env bash
# Issue 34: one step. Consistency distillation (II.18) of the 5-epoch conditional default, the
# flow teacher and its reflow (II.17), then each at 1, 2 and 4 network evaluations beside the
# default sampler, judged at 10,000 samples. Run from the repository root, one run at a time;
# about 25 + 13 + 18 minutes of training on 2 CPU cores (the 2026-12-04 AMD), and 20 of judging.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=runs/one_step
train() { /usr/bin/time -f "%e s wall" python vanilla_diffusion.py train --data-dir "$DATA" "$@"; }
# the rows' teacher: the 5-epoch default, shipped until 2026-12-04 (the shipped file is now 4×)
mkdir -p $OUT/default && git show 90c1388:assets/models/conditional.pt > $OUT/default/ckpt.pt
train --distill-from $OUT/default/ckpt.pt --out-dir $OUT/consistency
train --cond --objective flow --out-dir $OUT/flow
train --reflow-from $OUT/flow/ckpt.pt --pairs 20000 --out-dir $OUT/reflow
judge() { python vanilla_diffusion.py evaluate --data-dir "$DATA" --per-label 1000 --ckpt "$@" \
            | grep -v "^  [a-z]* step \|^  drew "; }
judge $OUT/default/ckpt.pt --guidance-scales 1.5 \
  --samplers dpm++2m-karras:1,dpm++2m-karras:2,dpm++2m-karras:4,dpm++2m-karras:15
judge $OUT/consistency/ckpt.pt --samplers consistency:1,consistency:2,consistency:4
judge $OUT/flow/ckpt.pt --guidance-scales 1.5 --samplers euler:1,euler:2,euler:4,euler:15
judge $OUT/reflow/ckpt.pt --guidance-scales 1.5 --samplers euler:1,euler:2,euler:4
