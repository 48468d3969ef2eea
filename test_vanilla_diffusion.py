"""Tests that read like the math: each one names the property it proves.

Runs on the CPU always and on CUDA when there is a GPU. Deterministic: seeded torch, derandomized
Hypothesis without deadlines. Tolerances for statistics come from the sample size: a mean of n draws
with standard deviation σ lies within 5·σ/√n of its expectation (a 5σ test fails by chance ~1 in 10⁶).
"""

import math
import os
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vanilla_diffusion as vd

settings.register_profile("torch", deadline=None, derandomize=True, max_examples=20, print_blob=True)
settings.load_profile("torch")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]
HERE = os.path.dirname(os.path.abspath(__file__))
T = 1000
timesteps = st.integers(min_value=0, max_value=T - 1)
batch_sizes = st.integers(min_value=1, max_value=6)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(scope="module")
def scheduler():
    return vd.NoiseScheduler(T)


def tiny_config(**overrides):
    base = dict(width=32, depth=2, heads=2, label_tokens=2, conv_channels=8, cond=True)
    return vd.Config(**{**base, **overrides})


def randomized(model, seed=0, std=0.3):
    """A model with every weight random: DiT's zero-initialised gates would otherwise hide the wiring."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, std)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The noise schedule and the forward process
# ---------------------------------------------------------------------------------------------

def test_alpha_bar_decreases_strictly_inside_unit_interval(scheduler):
    alpha_bar = scheduler.alpha_bar.double()
    assert (alpha_bar > 0).all() and (alpha_bar < 1).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)  # ᾱ_t = ∏ (1 − β_s)
    torch.testing.assert_close(alpha_bar, expected, rtol=1e-6, atol=0)


@given(t=timesteps, batch=batch_sizes, side=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_noise_image_matches_closed_form(scheduler, t, batch, side, seed):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, side, side, generator=generator) * 2 - 1
    for step in (t, torch.full((batch,), t)):  # an int t and a [B] tensor t
        x_t, noise = scheduler.noise_image(x0, step)
        alpha_bar = math.prod(1 - b for b in torch.linspace(1e-4, 0.02, T, dtype=torch.float64)[: t + 1].tolist())
        torch.testing.assert_close(x_t - math.sqrt(alpha_bar) * x0, math.sqrt(1 - alpha_bar) * noise, atol=2e-6, rtol=1e-5)


def test_noise_image_accepts_a_different_t_per_image(scheduler):
    x0 = torch.ones(3, 1, 2, 2)
    noise = torch.zeros_like(x0)
    x_t, _ = scheduler.noise_image(x0, torch.tensor([0, 500, 999]), noise)
    torch.testing.assert_close(x_t[:, 0, 0, 0], scheduler.sqrt_alpha_bar[[0, 500, 999]])


@given(t=timesteps)
def test_noise_image_statistics_match_mean_and_std(scheduler, t):
    torch.manual_seed(t)
    n = 20000
    x0 = torch.linspace(-1, 1, 4).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    x_t, _ = scheduler.noise_image(x0, t)
    mean, std = scheduler.sqrt_alpha_bar[t], scheduler.sqrt_one_minus_alpha_bar[t]
    assert torch.allclose(x_t.mean(0), mean * x0[0], atol=5 * std.item() / math.sqrt(n))
    assert torch.allclose(x_t.std(0), std.expand(1, 2, 2), atol=5 * std.item() / math.sqrt(2 * n))


def test_noise_image_at_last_step_is_close_to_standard_normal(scheduler):
    torch.manual_seed(0)
    x0 = torch.ones(50000, 1, 1, 1)
    x_t, _ = scheduler.noise_image(x0, T - 1)
    assert scheduler.alpha_bar[T - 1] < 1e-4
    assert abs(x_t.mean().item()) < 5 / math.sqrt(50000) + scheduler.sqrt_alpha_bar[T - 1]
    assert abs(x_t.std().item() - 1) < 5 / math.sqrt(2 * 50000)


# ---------------------------------------------------------------------------------------------
# Reverse steps: DDPM (sample_prev_image_distribution) and DDIM
# ---------------------------------------------------------------------------------------------

@given(t=timesteps, batch=batch_sizes, clip=st.booleans(), posterior=st.booleans())
def test_reverse_steps_preserve_shape_dtype_and_device(scheduler, t, batch, clip, posterior):
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        table = scheduler.to(device)
        x_t = torch.randn(batch, 1, 28, 28, device=device)
        pred_noise = torch.randn_like(x_t)
        for out in (table.sample_prev_image_distribution(x_t, t, pred_noise, clip_x0=clip, posterior_variance=posterior),
                    table.ddim_step(x_t, t, t - 1, pred_noise, eta=float(posterior), clip_x0=clip)):
            assert out.shape == x_t.shape and out.dtype == x_t.dtype and out.device == x_t.device
    scheduler.to("cpu")


def test_reverse_step_at_t0_adds_no_noise(scheduler, device):
    table = scheduler.to(device)
    x_t = torch.randn(4, 1, 28, 28, device=device)
    pred_noise = torch.randn_like(x_t)
    outs = [table.sample_prev_image_distribution(x_t, 0, pred_noise, torch.Generator().manual_seed(s)) for s in (1, 2)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    noisy = [table.sample_prev_image_distribution(x_t, 1, pred_noise, torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.equal(noisy[0], noisy[1])
    scheduler.to("cpu")


def noised_sample(scheduler, t, seed):
    """x0 ~ U[−1, 1], ε ~ N(0, I) and x_t = noise_image(x0, t, ε), for a small seeded batch."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 1, 8, 8, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    return x0, noise, scheduler.noise_image(x0, t, noise)[0]


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_true_noise_gives_back_x0_and_ddim_eta0_recovers_it_exactly(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    tolerance = 1e-5 / scheduler.sqrt_alpha_bar[t].item()  # float32 error of x_t, amplified by 1/√ᾱ_t
    torch.testing.assert_close(scheduler.predict_x0(x_t, t, noise), x0, atol=tolerance, rtol=0)
    torch.testing.assert_close(scheduler.ddim_step(x_t, t, -1, noise), x0, atol=tolerance, rtol=0)
    # and η = 0 with the true ε walks along the same noise: it lands on noise_image(x0, t_prev, ε)
    t_prev = t // 2 if t > 0 else -1
    if t_prev >= 0:
        torch.testing.assert_close(scheduler.ddim_step(x_t, t, t_prev, noise), scheduler.noise_image(x0, t_prev, noise)[0],
                                   atol=tolerance, rtol=0)


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_velocity_target_converts_back_to_the_true_noise(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    velocity = scheduler.velocity(x0, t, noise)  # v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
    torch.testing.assert_close(scheduler.noise_from_velocity(x_t, t, velocity), noise, atol=1e-5, rtol=1e-5)
    if t == T - 1:  # at the noisiest step v is almost −x0: the network predicts the image, not the noise
        torch.testing.assert_close(velocity, -x0, atol=0.01, rtol=0)


def posterior_mean(scheduler, x0, x_t, t):
    """μ̃_t(x_t, x0) = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, from float64 tables."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    alpha_bar_prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    coef_x0 = alpha_bar_prev.sqrt() * betas[t] / (1 - alpha_bar[t])
    coef_xt = (1 - betas[t]).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar[t])
    return (coef_x0 * x0.double() + coef_xt * x_t.double()).float()


@given(t=st.integers(1, T - 1), clip=st.booleans())
def test_ddpm_step_mean_matches_posterior_mean_closed_form(scheduler, t, clip):
    torch.manual_seed(t)
    n = 20000
    x0 = torch.linspace(-0.9, 0.9, 4).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    x_t, noise = scheduler.noise_image(x0, t, torch.randn(1, 1, 2, 2).expand(n, 1, 2, 2))  # one x_t, n copies
    x_prev = scheduler.sample_prev_image_distribution(x_t, t, noise, clip_x0=clip)
    sigma = scheduler.betas[t].sqrt().item()  # σ_t = √β_t
    expected = posterior_mean(scheduler, x0[:1], x_t[:1], t)[0]
    atol = 5 * sigma / math.sqrt(n) + 1e-4 / scheduler.sqrt_alpha_bar[t].item()
    torch.testing.assert_close(x_prev.mean(0), expected, atol=atol, rtol=0)
    assert abs(x_prev.std(0).mean().item() - sigma) < 5 * sigma / math.sqrt(2 * n)


@given(t=st.integers(1, T - 1), seed=st.integers(0, 2**16))
def test_ddim_with_eta1_on_consecutive_steps_is_ddpm_with_posterior_variance(scheduler, t, seed):
    x_t = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    pred_noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed + 1))
    ddim = scheduler.ddim_step(x_t, t, t - 1, pred_noise, eta=1.0, generator=torch.Generator().manual_seed(7))
    ddpm = scheduler.sample_prev_image_distribution(x_t, t, pred_noise, torch.Generator().manual_seed(7), posterior_variance=True)
    torch.testing.assert_close(ddim, ddpm, atol=2e-4 / scheduler.sqrt_alpha_bar[t].item(), rtol=1e-4)


def test_sampling_timesteps_run_from_start_to_zero_without_repeats():
    assert vd.sampling_timesteps(999, 20)[0] == 999 and vd.sampling_timesteps(999, 20)[-1] == 0
    assert len(vd.sampling_timesteps(999, 20)) == 20
    assert vd.sampling_timesteps(3, 20) == [3, 2, 1, 0]
    assert vd.sampling_timesteps(999, 1) == [999]


# ---------------------------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------------------------

def test_flow_interpolation_endpoints_are_data_and_noise():
    x0, noise = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(vd.flow_interpolate(x0, torch.zeros(3), noise), x0)
    torch.testing.assert_close(vd.flow_interpolate(x0, torch.ones(3), noise), noise)


class ExactVelocity(torch.nn.Module):
    """The true velocity field of a data set holding one image x*: v(x_s, s) = (x_s − x*) / s."""

    def __init__(self, target, num_timesteps=T):
        super().__init__()
        self.target, self.num_timesteps = target, num_timesteps
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        s = (t / (self.num_timesteps - 1)).reshape(-1, 1, 1, 1)
        return (x - self.target) / s


@given(batch=batch_sizes, steps=st.integers(1, 30))
def test_euler_with_the_exact_velocity_reaches_the_data_point(batch, steps):
    target = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    config = vd.Config(objective="flow", image_size=4)
    out = vd.generate(ExactVelocity(target), None, config, None, shape=(batch, 1, 4, 4), guidance_scale=1.0,
                      sampler="euler", steps=steps, generator=torch.Generator().manual_seed(batch))
    assert out.shape == (batch, 1, 4, 4)
    torch.testing.assert_close(out, target.expand(batch, 1, 4, 4), atol=1e-5, rtol=0)


def test_flow_training_target_is_noise_minus_x0():
    class Recorder(torch.nn.Module):
        def forward(self, x, t, labels):
            self.inputs = (x, t)
            return torch.zeros_like(x)

    config = vd.Config(objective="flow", cond=False)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    model = Recorder()
    per_image, s = vd.training_loss(model, None, x0, None, config)
    x_s, t = model.inputs
    torch.testing.assert_close(t, s * (T - 1))
    noise = (x_s - (1 - s).reshape(-1, 1, 1, 1) * x0) / s.reshape(-1, 1, 1, 1)  # invert x_s = (1−s)·x0 + s·ε
    torch.testing.assert_close(per_image, (noise - x0).pow(2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The DiT
# ---------------------------------------------------------------------------------------------

@given(batch=batch_sizes, patch=st.sampled_from([1, 2, 4, 7, 14]), channels=st.integers(1, 3))
def test_patchify_then_unpatchify_is_the_identity(batch, patch, channels):
    images = torch.randn(batch, channels, 28, 28)
    tokens = vd.patchify(images, patch)
    assert tokens.shape == (batch, (28 // patch) ** 2, channels * patch * patch)
    torch.testing.assert_close(vd.unpatchify(tokens, patch, channels), images, rtol=0, atol=0)
    # token 1 is the second patch of the first row
    torch.testing.assert_close(tokens[:, 1].reshape(batch, channels, patch, patch), images[:, :, :patch, patch:2 * patch])


@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.parametrize("conv_channels", [0, 8])
def test_dit_output_shape_equals_input_shape(device, cond, conv_channels):
    model = randomized(vd.DiT(tiny_config(cond=cond, conv_channels=conv_channels))).to(device)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28, device=device)
        labels = torch.randint(0, 11, (batch,), device=device) if cond else None
        out = model(x, torch.randint(0, T, (batch,), device=device), labels)
        assert out.shape == x.shape and out.device == x.device


@pytest.mark.parametrize("conv_channels", [0, 8])
def test_dit_starts_by_predicting_zero(conv_channels):
    model = vd.DiT(tiny_config(conv_channels=conv_channels))
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([3, 900]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the last layer starts at zero


def test_changing_the_label_changes_the_output(device):
    model = randomized(vd.DiT(tiny_config())).to(device)
    x = torch.randn(1, 1, 28, 28, device=device).expand(11, 1, 28, 28)
    out = model(x, torch.full((11,), 500, device=device), torch.arange(11, device=device))  # digits 0-9 and ∅
    differences = (out[:, None] - out[None]).abs().flatten(2).amax(-1)  # [11, 11]
    assert (differences + torch.eye(11, device=device) > 1e-3).all()


def test_cross_attention_has_several_keys_and_weights_that_depend_on_the_image_token():
    model = randomized(vd.DiT(tiny_config()))
    captured = {}
    block = model.blocks[0]
    block.cross_attn.register_forward_hook(lambda module, inputs, output: captured.update(inputs=inputs, output=output))
    model(torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([3, 10]))
    queries, context = captured["inputs"]
    assert context.shape[1] >= 2  # one key would make softmax ≡ 1: an added bias that ignores the image
    weights = block.cross_attn.attention_weights(queries, context)  # [B, heads, N, M]
    assert weights.shape == (2, 2, 49, context.shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 49))
    assert weights.std(dim=2).amax() > 1e-2  # image tokens attend differently
    _, _, values = block.cross_attn.project(queries, context)  # SDPA computes exactly softmax(QKᵀ/√d)·V
    expected = block.cross_attn.out((weights @ values).transpose(1, 2).flatten(2))
    torch.testing.assert_close(captured["output"], expected, atol=1e-5, rtol=1e-4)


def test_null_label_is_a_real_embedding_row_and_unconditional_model_ignores_labels():
    model = randomized(vd.DiT(tiny_config()))
    assert model.label_embed.num_embeddings == 11
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 100])
    null_out = model(x, t, torch.full((2,), vd.NULL_LABEL))
    assert torch.isfinite(null_out).all() and not torch.allclose(null_out, model(x, t, torch.tensor([4, 4])))
    unconditional = randomized(vd.DiT(tiny_config(cond=False)))
    assert all(block.cross_attn is None for block in unconditional.blocks)
    torch.testing.assert_close(unconditional(x, t, None), unconditional(x, t, torch.tensor([1, 2])))


@given(p=st.floats(0.0, 1.0))
def test_label_dropout_replaces_labels_with_null_at_rate_p(p):
    n = 20000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    dropped = vd.drop_labels(labels, p, torch.Generator().manual_seed(1))
    is_null = dropped == vd.NULL_LABEL
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others are untouched
    assert abs(is_null.float().mean().item() - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------

def test_guidance_scale_1_is_conditional_0_is_unconditional_and_negative_fills_the_uncond_branch(device):
    model = randomized(vd.DiT(tiny_config())).to(device)
    x = torch.randn(3, 1, 28, 28, device=device)
    t, labels = torch.tensor([5, 400, 999], device=device), torch.tensor([1, 4, 7], device=device)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, vd.NULL_LABEL))
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * cond.abs().max().item())  # batched vs not: float32 rounding, amplified by depth
    close(vd.guided_prediction(model, x, t, labels, 1.0), cond)
    close(vd.guided_prediction(model, x, t, labels, 0.0), uncond)
    close(vd.guided_prediction(model, x, t, labels, 3.0), uncond + 3 * (cond - uncond))
    negative = torch.tensor([2, 2, 2], device=device)
    close(vd.guided_prediction(model, x, t, labels, 0.0, negative), model(x, t, negative))


# ---------------------------------------------------------------------------------------------
# Training, checkpoints, image-to-image, evaluation
# ---------------------------------------------------------------------------------------------

def synthetic_digits(n, seed=0):
    """Bright bars at a label-dependent row on a dark background, in [−1, 1]: something easy to learn."""
    labels = torch.arange(n) % 10
    images = -torch.ones(n, 1, 28, 28)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 + 2 * label:5 + 2 * label, 4:24] = 1
    return images, labels


def test_a_few_dozen_training_steps_lower_the_loss(device):
    torch.manual_seed(0)
    config = tiny_config(lr=3e-3, warmup_steps=5)
    model, scheduler = vd.build_model(config, device)
    images, labels = (tensor.to(device) for tensor in synthetic_digits(64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)

    def fixed_loss():  # the same t and ε each time, so before and after are comparable
        torch.manual_seed(123)
        with torch.no_grad():
            return vd.training_loss(model, scheduler, images, labels, config)[0].mean().item()

    before = fixed_loss()
    for step in range(40):
        for group in optimizer.param_groups:
            group["lr"] = vd.learning_rate(step, 40, config)
        loss = vd.training_loss(model, scheduler, images, labels, config)[0].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_learning_rate_warms_up_then_decays_to_zero():
    config = vd.Config(lr=1e-3, warmup_steps=10)
    rates = [vd.learning_rate(step, 100, config) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[100] == pytest.approx(0, abs=1e-12)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    config = tiny_config()
    model, _ = vd.build_model(config, "cpu")
    randomized(model)
    ema = randomized(vd.DiT(config), seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    path = str(tmp_path / "run" / "ckpt.pt")
    vd.save_checkpoint(path, model, ema, optimizer, config, step=7)
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # the temporary file was renamed away
    state, loaded_config = vd.load_checkpoint(path)
    assert loaded_config == config and state["step"] == 7
    restored = vd.DiT(loaded_config)
    restored.load_state_dict(state["ema"])
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 999]), torch.tensor([0, 10])
    assert torch.equal(restored.eval()(x, t, labels), ema(x, t, labels))


def test_img2img_strength_near_zero_keeps_the_image_and_one_ignores_it():
    config = tiny_config()
    model = randomized(vd.DiT(config), std=0.05)  # outputs of order 1, like a trained model's
    scheduler = vd.NoiseScheduler(T)
    three, eight = synthetic_digits(10)[0][[3, 8]].split(1)

    def img2img(init, strength):
        return vd.generate(model, scheduler, config, torch.tensor([8]), shape=(1, 1, 28, 28), guidance_scale=2.0,
                           sampler="ddim", steps=10, init_images=init, strength=strength,
                           generator=torch.Generator().manual_seed(0))

    assert (img2img(three, 0.0001) - three).abs().max() < 0.1
    from_three, from_eight = img2img(three, 1.0), img2img(eight, 1.0)
    assert (from_three - from_eight).abs().mean() < 0.1 * (three - eight).abs().mean()  # √ᾱ_{T−1} ≈ 0.006 of the image is left


def test_frechet_distance_matches_the_gaussian_closed_form():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    b = torch.randn(20000, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    # for diagonal covariances: ‖μ_a − μ_b‖² + Σ (σ_a − σ_b)² = 1 + (0 + 1 + 0.25)
    assert vd.frechet_distance(a, b) == pytest.approx(2.25, abs=0.1)
    assert vd.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The command line, driven like a user would, on a tiny MNIST written in the real file format
# ---------------------------------------------------------------------------------------------

def write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + bytes(array.flatten().tolist()))


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """A 200-image MNIST in the idx format torchvision reads, so the real loading path is exercised."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 200), ("t10k", 100)):
        images, labels = synthetic_digits(n)
        pixels = ((images[:, 0] + 1) * 127.5).round().to(torch.uint8)
        write_idx(raw / f"{split}-images-idx3-ubyte", pixels, 2051)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels.to(torch.uint8), 2049)
    return str(root)


TINY_MODEL = ["--width", "32", "--depth", "1", "--conv-channels", "8", "--batch-size", "16"]


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "vanilla_diffusion.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    """`train --cond` for a few steps through the real command line; returns the checkpoint path."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--cond", "--data-dir", tiny_mnist, "--max-steps", "3", "--out-dir", str(out), "--device", "cpu",
                     *TINY_MODEL, cwd=out)
    assert result.returncode == 0, result.stderr
    assert "M parameters" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout
    assert (out / "ckpt.pt").is_file() and (out / "samples_step000003.png").is_file()
    return str(out / "ckpt.pt")


def png_size(path):
    from PIL import Image
    with Image.open(path) as picture:
        return picture.size


def test_train_then_sample_writes_a_png_grid_of_the_expected_size(trained, tmp_path):
    result = run_cli("sample", "--ckpt", trained, "--label", "4", "--n", "4", "--steps", "5", "--output", "four.png",
                     "--gif", "four.gif", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "four.png") == (2 + 2 * 30, 2 + 2 * 30)  # 2×2 images of 28 px, padding 2
    assert (tmp_path / "four.gif").stat().st_size > 0


def test_resume_continues_from_the_saved_step(trained, tiny_mnist, tmp_path):
    import shutil
    shutil.copy(trained, tmp_path / "ckpt.pt")
    vd.main(["train", "--resume", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path), "--max-steps", "5", "--device", "cpu"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 5


def test_sample_without_label_draws_one_row_per_digit(trained, tmp_path):
    vd.main(["sample", "--ckpt", trained, "--n", "2", "--steps", "2", "--output", str(tmp_path / "all.png")])
    assert png_size(tmp_path / "all.png") == (2 + 2 * 30, 2 + 10 * 30)


def test_evaluate_prints_accuracy_and_distance_table(trained, tiny_mnist, capsys):
    vd.main(["evaluate", "--ckpt", trained, "--data-dir", tiny_mnist, "--per-label", "2", "--guidance-scales", "0,3",
             "--samplers", "ddim:3"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith("ddim")]
    assert [row[2] for row in rows] == ["0", "3"]
    assert all(row[3].endswith("%") and float(row[-2]) >= 0 for row in rows)


@pytest.mark.parametrize("args, message", [
    (["sample", "--label", "12"], "must be a digit 0-9"),
    (["sample", "--n", "-3"], "positive whole number"),
    (["sample", "--steps", "0"], "positive whole number"),
    (["sample", "--strength", "1.5"], "(0, 1]"),
    (["sample", "--ckpt", "/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["sample", "--steps", "5000"], "--steps must be between 1 and T = 1000"),
    (["sample", "--sampler", "euler"], "--objective flow"),
    (["sample", "--sampler", "ddpm", "--steps", "10"], "all T = 1000 steps"),
    (["sample", "--init-image", "/nonexistent.png", "--label", "3"], "no init image"),
    (["evaluate", "--guidance-scales", "2,x"], "comma-separated numbers"),
    (["evaluate", "--samplers", "ddim:abc"], "sampler:steps"),
    (["evaluate", "--samplers", "ddim:2000"], "--steps must be between 1 and T = 1000"),
])
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(trained, args, message, capsys):
    if "--ckpt" not in args:
        args = [*args, "--ckpt", trained]
    with pytest.raises(SystemExit) as exit_info:
        vd.main(args)
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_corrupted_checkpoint_and_unconditional_label_and_bad_image_are_clear_errors(trained, tiny_mnist, tmp_path, capsys):
    corrupted = tmp_path / "ckpt.pt"
    corrupted.write_bytes(b"not a checkpoint")
    unconditional = tmp_path / "uncond"
    vd.main(["train", "--data-dir", tiny_mnist, "--max-steps", "1", "--out-dir", str(unconditional), *TINY_MODEL])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    mismatched = tmp_path / "mismatched.pt"
    state = torch.load(trained, weights_only=True)
    state["config"]["conv_channels"] = 0  # weights of one architecture, config of another
    torch.save(state, mismatched)
    cases = [(["sample", "--ckpt", str(corrupted)], "is not a readable VanillaDiffusion checkpoint"),
             (["sample", "--ckpt", str(mismatched)], "do not fit the model"),
             (["sample", "--ckpt", str(unconditional / "ckpt.pt"), "--label", "3"], "is an unconditional model"),
             (["sample", "--ckpt", trained, "--label", "3", "--init-image", str(not_an_image)], "could not read")]
    capsys.readouterr()
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            vd.main(args)
        assert exit_info.value.code == 1 and message in capsys.readouterr().err
    assert corrupted.read_bytes() == b"not a checkpoint"  # a failed command destroys nothing


def test_missing_mnist_without_network_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(MNIST, "download", no_network)
    with pytest.raises(SystemExit) as exit_info:
        vd.main(["train", "--data-dir", str(tmp_path / "empty"), "--max-steps", "1"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and str(tmp_path / "empty" / "MNIST" / "raw") in error and "--data-dir" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(trained, capsys):
    with pytest.raises(SystemExit):
        vd.main(["sample", "--ckpt", trained, "--device", "cuda"])
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_importing_the_module_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import vanilla_diffusion"], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_flow_checkpoint_samples_with_euler_does_img2img_and_refuses_ddpm(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "flow"
    vd.main(["train", "--cond", "--objective", "flow", "--data-dir", tiny_mnist, "--max-steps", "2", "--out-dir", str(out), *TINY_MODEL])
    ckpt = str(out / "ckpt.pt")
    assert vd.load_checkpoint(ckpt)[1].objective == "flow"
    vd.main(["sample", "--ckpt", ckpt, "--label", "8", "--n", "4", "--steps", "3", "--output", str(tmp_path / "a.png")])
    vd.main(["sample", "--ckpt", ckpt, "--label", "8", "--n", "4", "--steps", "3", "--init-image", os.path.join(HERE, "assets", "three.png"),
             "--strength", "0.5", "--output", str(tmp_path / "b.png")])
    assert "euler with 3 steps" in capsys.readouterr().out
    assert png_size(tmp_path / "a.png") == png_size(tmp_path / "b.png") == (62, 62)
    with pytest.raises(SystemExit):
        vd.main(["sample", "--ckpt", ckpt, "--sampler", "ddpm"])
    assert "trained with --objective flow" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Samplers against a known answer: the exact denoiser of a data set that holds one image x*
# ---------------------------------------------------------------------------------------------

class ExactDenoiser(torch.nn.Module):
    """The exact network for a data set of one image x*.

    ε*(x_t, t) = (x_t − √ᾱ_t·x*) / √(1 − ᾱ_t); as v: v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x*.
    Every correct sampler, started anywhere, must land on x*.
    """

    def __init__(self, target, scheduler, prediction):
        super().__init__()
        self.target, self.scheduler, self.prediction = target, scheduler, prediction
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # generate() asks the model for its device

    def forward(self, x, t, labels=None):
        index = t.round().long()
        sqrt_alpha_bar = self.scheduler.sqrt_alpha_bar[index].reshape(-1, 1, 1, 1)
        sqrt_one_minus = self.scheduler.sqrt_one_minus_alpha_bar[index].reshape(-1, 1, 1, 1)
        noise = (x - sqrt_alpha_bar * self.target) / sqrt_one_minus
        if self.prediction == "eps":
            return noise
        return sqrt_alpha_bar * noise - sqrt_one_minus * self.target


X_STAR = torch.linspace(-0.95, 0.95, 16).reshape(1, 1, 4, 4)


def sample_exact(scheduler, *, prediction, sampler, steps, clip, cond, strength=1.0, init=None,
                 guidance_scale=2.0, batch=3, seed=0):
    config = vd.Config(image_size=4, prediction=prediction, clip_x0=clip, cond=cond)
    model = ExactDenoiser(X_STAR, scheduler, prediction)
    labels = torch.arange(batch) % 10 if cond else None
    return vd.generate(model, scheduler, config, labels, shape=(batch, 1, 4, 4),
                       guidance_scale=guidance_scale, sampler=sampler, steps=steps,
                       init_images=init, strength=strength,
                       generator=torch.Generator().manual_seed(seed))


@given(steps=st.integers(1, 60), prediction=st.sampled_from(["eps", "v"]), clip=st.booleans(),
       cond=st.booleans(), seed=st.integers(0, 2**16))
def test_ddim_with_the_exact_denoiser_lands_on_the_data_point(scheduler, steps, prediction, clip,
                                                              cond, seed):
    out = sample_exact(scheduler, prediction=prediction, sampler="ddim", steps=steps, clip=clip,
                       cond=cond, seed=seed)
    torch.testing.assert_close(out, X_STAR.expand_as(out), atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_over_all_t_with_the_exact_denoiser_lands_on_the_data_point(scheduler, prediction,
                                                                        clip):
    out = sample_exact(scheduler, prediction=prediction, sampler="ddpm", steps=T, clip=clip,
                       cond=True, seed=3)
    # the last step (t = 0) adds no noise and its mean is x* itself; a loop that stopped at t = 1
    # would leave noise of std √β_1 ≈ 0.01
    torch.testing.assert_close(out, X_STAR.expand_as(out), atol=1e-4, rtol=0)


@given(strength=st.floats(0.001, 1.0), sampler=st.sampled_from(["ddim", "ddpm"]),
       steps=st.integers(1, 30), prediction=st.sampled_from(["eps", "v"]), clip=st.booleans())
def test_img2img_with_the_exact_denoiser_lands_on_the_data_point_at_any_strength(
        scheduler, strength, sampler, steps, prediction, clip):
    init = -X_STAR.flip(-1).expand(2, 1, 4, 4)  # any other picture: the data set holds only x*
    out = sample_exact(scheduler, prediction=prediction, sampler=sampler,
                       steps=T if sampler == "ddpm" else steps, clip=clip, cond=False,
                       strength=strength, init=init, batch=2)
    torch.testing.assert_close(out, X_STAR.expand_as(out), atol=1e-4, rtol=0)


@given(strength=st.floats(0.001, 1.0), steps=st.integers(1, 30))
def test_euler_img2img_with_the_exact_velocity_lands_on_the_data_point(strength, steps):
    target = X_STAR
    config = vd.Config(objective="flow", image_size=4)
    init = torch.zeros(2, 1, 4, 4)
    out = vd.generate(ExactVelocity(target), None, config, None, shape=(2, 1, 4, 4),
                      guidance_scale=1.0, sampler="euler", steps=steps, init_images=init,
                      strength=strength, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-5, rtol=0)


@given(t=timesteps, t_prev_fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_ddim_clipped_branch_equals_unclipped_where_clipping_is_inactive(scheduler, t,
                                                                         t_prev_fraction, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)  # x0 ∈ [−1, 1]: the clamp changes nothing
    t_prev = math.floor(t_prev_fraction * t) - 1       # any earlier step, or −1 for "to x0"
    clipped = scheduler.ddim_step(x_t, t, t_prev, noise, clip_x0=True)
    unclipped = scheduler.ddim_step(x_t, t, t_prev, noise, clip_x0=False)
    torch.testing.assert_close(clipped, unclipped, atol=1e-4, rtol=1e-4)


@given(t=st.integers(1, T - 1), seed=st.integers(0, 2**16))
def test_ddpm_clipped_mean_equals_unclipped_where_clipping_is_inactive(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    steps = [scheduler.sample_prev_image_distribution(x_t, t, noise, clip_x0=clip,
                                                      generator=torch.Generator().manual_seed(1))
             for clip in (True, False)]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-4)


class Recorder(torch.nn.Module):
    """Returns zeros and remembers what it was given, so the loss is a known function of the input."""

    def forward(self, x, t, labels):
        self.inputs = (x, t)
        return torch.zeros_like(x)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_training_loss_weights_match_their_closed_forms(scheduler, prediction, gamma):
    torch.manual_seed(0)
    config = vd.Config(prediction=prediction, min_snr_gamma=gamma, cond=False)
    x0 = torch.rand(256, 1, 4, 4) * 2 - 1
    model = Recorder()
    per_image, _ = vd.training_loss(model, scheduler, x0, None, config)
    x_t, t = model.inputs
    t = t.long()
    sqrt_alpha_bar = scheduler.sqrt_alpha_bar[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus = scheduler.sqrt_one_minus_alpha_bar[t].reshape(-1, 1, 1, 1)
    noise = (x_t - sqrt_alpha_bar * x0) / sqrt_one_minus
    target = noise if prediction == "eps" else sqrt_alpha_bar * noise - sqrt_one_minus * x0
    snr = scheduler.alpha_bar[t] / (1 - scheduler.alpha_bar[t])
    if gamma == 0:
        weight = torch.ones_like(snr)
    elif prediction == "eps":
        weight = torch.minimum(snr, torch.tensor(gamma)) / snr        # min(SNR, γ) / SNR
    else:
        weight = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)  # min(SNR, γ) / (SNR + 1)
    expected = weight * target.pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_image, expected, rtol=1e-3, atol=1e-6)
