"""The MNIST PNG folder against --data mnist: same pixels and labels (in ImageFolder's order:
class-major, then by file name = MNIST index), and the same losses for the same seed."""
import sys, tempfile, time, torch
sys.path.insert(0, ".")
import vanilla_diffusion as vd
mnist = vd.find_data("mnist", "../shared/data").decode()
started = time.time()
folder = vd.find_data(sys.argv[1]).decode()
print(f"folder decoded in {time.time() - started:.1f} s")
order = torch.sort(mnist.labels, stable=True).indices     # class-major, index order within
same_pixels = torch.equal(mnist.pixels[order], folder.pixels)
same_labels = torch.equal(mnist.labels[order], folder.labels)
print("names", folder.class_names, "same pixels:", same_pixels, "same labels:", same_labels)
config = vd.Config(cond=True)
losses = []
for pixels, labels in ((mnist.pixels[order], mnist.labels[order]), (folder.pixels, folder.labels)):
    run = vd.train(config, vd.Images(pixels, labels, ()), out_dir=tempfile.mkdtemp(),
                   total_steps=30, seed=0)
    losses.append([p.detach().clone() for p in run.model.parameters()])
print("largest weight difference after 30 steps:",
      max((a - b).abs().max().item() for a, b in zip(*losses)))
