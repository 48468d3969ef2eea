"""Make a shipped model (assets/models/*.pt) from a training checkpoint: the EMA (and the
autoguidance guide) in float16, the config and the format; no optimiser and no random state,
so it samples but cannot resume (`train --resume` refuses it). A third argument, w, replaces the
config's guidance scale (CFG's, or an unconditional model's autoguidance): the w at which that
model was judged best (a longer-trained model wants less guidance; docs/experiments.md).

    python docs/scripts/ship_checkpoint.py runs/ship_cond/ckpt.pt assets/models/conditional.pt 1.3
"""
import os
import sys
from dataclasses import asdict, replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import vanilla_diffusion as vd  # noqa: E402


def ship_checkpoint(path, out_path, guidance_scale=None):
    state, config = vd.load_checkpoint(path)
    if guidance_scale is not None:
        field = "guidance_scale" if config.cond else "autoguidance_scale"
        config = replace(config, **{field: guidance_scale})
    half = lambda weights: None if weights is None else {
        name: value.half() for name, value in weights.items()}
    vd.durable_save({"ema": half(state["ema"]), "guide": half(state.get("guide")),
                     "config": asdict(config), "step": state["step"], "seed": state.get("seed"),
                     "format": vd.CHECKPOINT_FORMAT, "shipped": True}, out_path)


if __name__ == "__main__":
    ship_checkpoint(*sys.argv[1:3], *map(float, sys.argv[3:4]))
    print(f"wrote {sys.argv[2]}")
