"""Make a shipped model (assets/models/*.pt) from a training checkpoint: the EMA (and the
autoguidance guide) in float16, the config and the format; no optimiser and no random state,
so it samples but cannot resume (`train --resume` refuses it).

    python docs/scripts/ship_checkpoint.py runs/ship_cond/ckpt.pt assets/models/conditional.pt
"""
import os
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import vanilla_diffusion as vd  # noqa: E402


def ship_checkpoint(path, out_path):
    state, config = vd.load_checkpoint(path)
    half = lambda weights: None if weights is None else {
        name: value.half() for name, value in weights.items()}
    vd.durable_save({"ema": half(state["ema"]), "guide": half(state.get("guide")),
                     "config": asdict(config), "step": state["step"], "seed": state.get("seed"),
                     "format": vd.CHECKPOINT_FORMAT, "shipped": True}, out_path)


if __name__ == "__main__":
    ship_checkpoint(sys.argv[1], sys.argv[2])
    print(f"wrote {sys.argv[2]}")
