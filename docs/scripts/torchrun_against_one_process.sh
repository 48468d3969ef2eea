#!/usr/bin/env bash
# torchrun on 2 CPU processes against one process, the same global batch (32), 300 steps.
set -e
rm -rf runs/ddp_one runs/ddp_two
F=vanilla_diffusion.py
python -m torch.distributed.run --standalone --nproc_per_node 2 $F train --cond \
  --data-dir ../shared/data --max-steps 300 --out-dir runs/ddp_two --device cpu 2>/dev/null | grep -E "^step 300|done in|M param"
python $F train --cond --data-dir ../shared/data --max-steps 300 --out-dir runs/ddp_one --device cpu | grep -E "^step 300|done in"
python - <<'PY'
import torch
a = torch.load("runs/ddp_one/ckpt.pt", weights_only=True); b = torch.load("runs/ddp_two/ckpt.pt", weights_only=True)
for part in ("model", "ema"):
    d = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
    s = max(a[part][k].abs().max().item() for k in a[part])
    print(part, "largest difference", f"{d:.2e}", "largest weight", f"{s:.2f}")
print("same generator state:", torch.equal(a["generator"], b["generator"]))
PY
