"""Export MNIST as PNG folders: grey (one folder a digit) and tinted colour at 32×32."""
import os, sys, torch
from PIL import Image
sys.path.insert(0, ".")
from torchvision.datasets import MNIST
d = MNIST("../shared/data", train=True, download=False)
grey, colour = sys.argv[1], sys.argv[2]
names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
tints = [(255, 60, 60), (60, 200, 60), (70, 110, 255), (255, 200, 0), (220, 60, 255),
         (0, 220, 220), (255, 130, 0), (160, 160, 160), (120, 255, 120), (255, 120, 190)]
for k in range(10):
    os.makedirs(f"{grey}/{k}", exist_ok=True); os.makedirs(f"{colour}/{names[k]}", exist_ok=True)
for i, (x, y) in enumerate(zip(d.data, d.targets.tolist())):
    Image.fromarray(x.numpy(), "L").save(f"{grey}/{y}/{i:05d}.png")
    v = x.float()[None] / 255                                    # [1, 28, 28]
    rgb = (v * torch.tensor(tints[y]).float()[:, None, None]).round().byte()
    img = Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB").resize((32, 32), Image.BILINEAR)
    img.save(f"{colour}/{names[y]}/{i:05d}.png")
