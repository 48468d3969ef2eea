"""VAE floors: train a VAE (II.16) of each shape on MNIST, pass the 1,000 test images evaluate
uses through it, and judge them with evaluate's classifier (distance to the test set).
Run from the repository root after `python vanilla_diffusion.py evaluate` has cached
runs/mnist_classifier.pt."""
import sys, time, torch
sys.path.insert(0, ".")
import vanilla_diffusion as vd
train = vd.find_data("mnist", "../shared/data").decode()
test = vd.find_data("mnist", "../shared/data", train=False).decode()
judge = vd.Classifier(); judge.load_state_dict(torch.load("runs/mnist_classifier.pt", weights_only=True))
features = vd.classify(judge, test.pixels)[1]
for factor, L, width, epochs in [(2, 2, 32, 2), (4, 4, 32, 2), (2, 4, 32, 2), (4, 8, 32, 2)]:
    torch.manual_seed(0)
    vae = vd.VAE(1, L, factor, width)
    started = time.time()
    vd.train_vae(vae, train.pixels, epochs, vd.progress_line("VAE"))
    seconds = time.time() - started
    with torch.no_grad():
        x = vd.as_x0(test.pixels[:1000])
        recon = vae.decode(vae.encode(x)[0]).clamp(-1, 1)
    d = vd.frechet_distance(vd.classify(judge, recon)[1], features)
    print(f"RESULT latent {L}x{28 // factor}x{28 // factor} width {width} epochs {epochs}: "
          f"{seconds:.0f} s, floor distance {d:.2f}, mse {(recon - x).pow(2).mean():.4f}", flush=True)
