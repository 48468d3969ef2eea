"""One noise per class through the teacher at 1 and 20 Euler steps and the reflowed model at 1."""
import sys, torch
sys.path.insert(0, "../..")  # run in runs/equal_time
import vanilla_diffusion as vd
rows = []
labels = torch.arange(10)
noise = vd.gaussian_like(torch.empty(10, 1, 28, 28), torch.Generator().manual_seed(0))
for path, steps in (("flow/ckpt.pt", 1), ("flow/ckpt.pt", 20), ("reflow/ckpt.pt", 1)):
    model, scheduler, config, guide, _ = vd.load_model(path, "cpu")
    rows.append(vd.generate(model, scheduler, config, labels, shape=noise.shape, noise=noise,
                            sampler="euler", steps=steps, guidance_scale=1.5))
names = ["teacher, 1 step", "teacher, 20 steps", "reflowed, 1 step"]
sheet = vd.sheet("The same noise, a column per digit", [(n, vd.as_picture(r, 10)) for n, r in
                                                          zip(names, rows)], margin=120)
sheet.save(sys.argv[1])
