"""Tests that read like the math: each one names the property it proves.

Runs on the CPU always and on CUDA when there is a GPU. Deterministic: seeded torch,
derandomized Hypothesis without deadlines. Tolerances for statistics come from the sample size:
a mean of n draws with standard deviation σ lies within 5·σ/√n of its expectation (a 5σ test
fails by chance about once in 10⁶). Samplers are checked against a known answer: the exact
denoiser of a data set that holds one image must bring every correct sampler to that image.
"""

import ast
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st

import vanilla_diffusion as vd

settings.register_profile("torch", deadline=None, derandomize=True, max_examples=20,
                          print_blob=True)
settings.load_profile("torch")

NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_GPU)]
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
    """A model with every weight random: DiT's zero-initialised gates would hide the wiring."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, std)
    return model.eval()


def linear_alpha_bar():
    """ᾱ_t = ∏_{s≤t} (1 − β_s) for the default linear β, in float64, independently of the code."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


def close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# The noise schedule and the forward process
# ---------------------------------------------------------------------------------------------

def test_alpha_bar_decreases_strictly_inside_unit_interval(scheduler):
    alpha_bar = scheduler.alpha_bar.double()
    assert (alpha_bar > 0).all() and (alpha_bar < 1).all()
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()
    torch.testing.assert_close(alpha_bar, linear_alpha_bar(), rtol=1e-6, atol=0)


@given(t=timesteps, batch=batch_sizes, side=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_noise_image_matches_closed_form(scheduler, t, batch, side, seed):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 1, side, side, generator=generator) * 2 - 1
    alpha_bar = linear_alpha_bar()[t].item()
    for step in (t, torch.full((batch,), t)):  # an int t and a [B] tensor t
        x_t, noise = scheduler.noise_image(x0, step)
        close(x_t - math.sqrt(alpha_bar) * x0, math.sqrt(1 - alpha_bar) * noise, 2e-6, 1e-5)


def test_noise_image_accepts_a_different_t_per_image(scheduler):
    x0 = torch.ones(3, 1, 2, 2)
    x_t, _ = scheduler.noise_image(x0, torch.tensor([0, 500, 999]), torch.zeros_like(x0))
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
    n = 50000
    x_t, _ = scheduler.noise_image(torch.ones(n, 1, 1, 1), T - 1)
    assert scheduler.alpha_bar[T - 1] < 1e-4
    assert abs(x_t.mean().item()) < 5 / math.sqrt(n) + scheduler.sqrt_alpha_bar[T - 1]
    assert abs(x_t.std().item() - 1) < 5 / math.sqrt(2 * n)


# ---------------------------------------------------------------------------------------------
# Reverse steps: DDPM (sample_prev_image_distribution) and DDIM
# ---------------------------------------------------------------------------------------------

def noised_sample(scheduler, t, seed, shape=(3, 1, 8, 8)):
    """x0 ~ U[−1, 1], ε ~ N(0, I) and x_t = noise_image(x0, t, ε), for a small seeded batch."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    return x0, noise, scheduler.noise_image(x0, t, noise)[0]


@given(t=timesteps, batch=batch_sizes, clip=st.booleans(), eta=st.booleans())
def test_reverse_steps_preserve_shape_dtype_and_device(scheduler, t, batch, clip, eta):
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        table = scheduler.to(device)
        x_t = torch.randn(batch, 1, 28, 28, device=device)
        pred_noise = torch.randn_like(x_t)
        ddpm = table.sample_prev_image_distribution(x_t, t, pred_noise)
        ddim = vd.ddim_step(table, x_t, t, t - 1, pred_noise, eta=float(eta), clip_x0=clip)
        for out in (ddpm, ddim):
            assert out.shape == x_t.shape and out.dtype == x_t.dtype and out.device == x_t.device
    scheduler.to("cpu")


def test_reverse_step_at_t0_adds_no_noise(scheduler, device):
    table = scheduler.to(device)
    x_t = torch.randn(4, 1, 28, 28, device=device)
    pred_noise = torch.randn_like(x_t)

    def step(t, seed):
        generator = torch.Generator().manual_seed(seed)
        return table.sample_prev_image_distribution(x_t, t, pred_noise, generator)

    assert torch.equal(step(0, 1), step(0, 2))
    assert not torch.equal(step(1, 1), step(1, 2))
    scheduler.to("cpu")


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_true_noise_gives_back_x0_and_ddim_eta0_recovers_it_exactly(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    tolerance = 1e-5 / scheduler.sqrt_alpha_bar[t].item()  # float32 error, amplified by 1/√ᾱ_t
    close(vd.predict_x0(scheduler, x_t, t, noise), x0, tolerance)
    close(vd.ddim_step(scheduler, x_t, t, -1, noise), x0, tolerance)
    # η = 0 with the true ε walks along the same noise: it lands on noise_image(x0, t_prev, ε)
    if t > 1:
        x_prev = scheduler.noise_image(x0, t // 2, noise)[0]
        close(vd.ddim_step(scheduler, x_t, t, t // 2, noise), x_prev, tolerance)


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_velocity_target_converts_back_to_the_true_noise(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    velocity = vd.velocity(scheduler, x0, t, noise)  # v = √ᾱ_t·ε − √(1−ᾱ_t)·x0
    close(vd.noise_from_velocity(scheduler, x_t, t, velocity), noise, 1e-5, 1e-5)
    if t == T - 1:  # at the noisiest step v is almost −x0: the network predicts the image
        close(velocity, -x0, 0.01)


def posterior_mean(x0, x_t, t):
    """μ̃_t(x_t, x0) = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t, in float64."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    alpha_bar = linear_alpha_bar()
    alpha_bar_prev = alpha_bar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    coef_x0 = alpha_bar_prev.sqrt() * betas[t] / (1 - alpha_bar[t])
    coef_xt = (1 - betas[t]).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar[t])
    return (coef_x0 * x0.double() + coef_xt * x_t.double()).float()


@given(t=st.integers(1, T - 1), clip=st.booleans())
def test_ddpm_step_mean_matches_posterior_mean_closed_form(scheduler, t, clip):
    torch.manual_seed(t)
    n = 20000
    x0 = torch.linspace(-0.9, 0.9, 4).reshape(1, 1, 2, 2).expand(n, 1, 2, 2)
    one_noise = torch.randn(1, 1, 2, 2).expand(n, 1, 2, 2)
    x_t, noise = scheduler.noise_image(x0, t, one_noise)  # one x_t, n copies
    if clip:  # II.6: the ε of the clamped x0, which is x0 itself here
        noise = vd.clamp_prediction(scheduler, x_t, t, noise)[1]
    x_prev = scheduler.sample_prev_image_distribution(x_t, t, noise)
    sigma = scheduler.betas[t].sqrt().item()  # σ_t = √β_t
    atol = 5 * sigma / math.sqrt(n) + 1e-4 / scheduler.sqrt_alpha_bar[t].item()
    close(x_prev.mean(0), posterior_mean(x0[:1], x_t[:1], t)[0], atol)
    assert abs(x_prev.std(0).mean().item() - sigma) < 5 * sigma / math.sqrt(2 * n)


@given(t=st.integers(1, T - 1), seed=st.integers(0, 2**16))
def test_ddim_with_eta1_on_consecutive_steps_is_ddpm_with_posterior_variance(scheduler, t, seed):
    """η = 1, t → t−1: the same mean as the DDPM step, and σ² = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t
    instead of β_t; from one generator both draw the same z."""
    x_t = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    pred_noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed + 1))
    ddim = vd.ddim_step(scheduler, x_t, t, t - 1, pred_noise, eta=1.0,
                        generator=torch.Generator().manual_seed(7))
    ddpm = scheduler.sample_prev_image_distribution(x_t, t, pred_noise,
                                                    torch.Generator().manual_seed(7))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
    alpha_bar, beta = linear_alpha_bar(), torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    posterior_variance = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * beta[t]   # β̃_t
    expected = ddpm + (posterior_variance.sqrt() - beta[t].sqrt()).float() * z
    close(ddim, expected, 2e-4 / scheduler.sqrt_alpha_bar[t].item(), 1e-4)


@given(t=timesteps, t_prev_fraction=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_ddim_clipped_branch_equals_unclipped_where_clipping_is_inactive(
        scheduler, t, t_prev_fraction, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)  # x0 ∈ [−1, 1]: the clamp does nothing
    t_prev = math.floor(t_prev_fraction * t) - 1       # any earlier step, or −1 for "to x0"
    clipped = vd.ddim_step(scheduler, x_t, t, t_prev, noise, clip_x0=True)
    close(clipped, vd.ddim_step(scheduler, x_t, t, t_prev, noise, clip_x0=False), 1e-4, 1e-4)


@given(t=st.integers(1, T - 1), seed=st.integers(0, 2**16))
def test_clamped_prediction_changes_nothing_where_x0_is_in_range(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    clamped_x0, clamped_noise = vd.clamp_prediction(scheduler, x_t, t, noise)
    tolerance = 1e-5 / scheduler.sqrt_alpha_bar[t].item()
    close(clamped_x0, x0, tolerance)
    close(clamped_noise, noise, 1e-4, 1e-4)


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_clamped_prediction_is_the_noise_of_the_clamped_x0(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    x_t = scheduler.noise_image(3 * x0, t, noise)[0]  # x0 ∈ [−3, 3]: the clamp acts
    clamped_x0, clamped_noise = vd.clamp_prediction(scheduler, x_t, t, noise)
    close(clamped_x0, (3 * x0).clamp(-1, 1), 3e-5 / scheduler.sqrt_alpha_bar[t].item())
    close(vd.predict_x0(scheduler, x_t, t, clamped_noise), clamped_x0,
          3e-5 / scheduler.sqrt_alpha_bar[t].item())


@given(start=st.integers(0, T - 1), steps=st.integers(1, 60))
def test_sampling_timesteps_are_even_from_the_start_and_stop_short_of_zero(start, steps):
    timesteps = vd.sampling_timesteps(start, steps)
    assert timesteps[0] == start and len(timesteps) == min(steps, start + 1 if start else 1)
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))          # no repeats
    assert timesteps[-1] == round(start / steps) if steps <= start else timesteps[-1] <= 1
    assert vd.sampling_timesteps(999, 10) == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


# ---------------------------------------------------------------------------------------------
# Samplers against a known answer: the exact denoiser of a data set that holds one image x*
# ---------------------------------------------------------------------------------------------

X_STAR = torch.linspace(-0.95, 0.95, 16).reshape(1, 1, 4, 4)


class ExactDenoiser(torch.nn.Module):
    """The exact network for a data set of one image x*.

    ε*(x_t, t) = (x_t − √ᾱ_t·x*) / √(1 − ᾱ_t); as v: v* = √ᾱ_t·ε* − √(1−ᾱ_t)·x*.
    Every correct sampler, started anywhere, must land on x*.
    """

    def __init__(self, target, scheduler, prediction):
        super().__init__()
        self.target, self.scheduler, self.prediction = target, scheduler, prediction
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # generate() asks for the device

    def forward(self, x, t, labels=None):
        index = t.round().long()
        sqrt_alpha_bar = self.scheduler.sqrt_alpha_bar[index].reshape(-1, 1, 1, 1)
        sqrt_one_minus = self.scheduler.sqrt_one_minus_alpha_bar[index].reshape(-1, 1, 1, 1)
        noise = (x - sqrt_alpha_bar * self.target) / sqrt_one_minus
        if self.prediction == "eps":
            return noise
        return sqrt_alpha_bar * noise - sqrt_one_minus * self.target


class ExactVelocity(torch.nn.Module):
    """The true velocity field of a data set holding one image x*: v(x_s, s) = (x_s − x*) / s."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        s = (t / (T - 1)).reshape(-1, 1, 1, 1)
        return (x - self.target) / s


def sample_exact(scheduler, *, prediction="v", sampler="ddim", steps=20, clip=True, cond=False,
                 strength=1.0, init=None, guidance_scale=2.0, batch=3, seed=0, eta=0.0):
    config = vd.Config(image_size=4, prediction=prediction, clip_x0=clip, cond=cond)
    model = ExactDenoiser(X_STAR, scheduler, prediction)
    labels = torch.arange(batch) % 10 if cond else None
    return vd.generate(model, scheduler, config, labels, shape=(batch, 1, 4, 4),
                       guidance_scale=guidance_scale, sampler=sampler, steps=steps,
                       init_images=init, strength=strength, eta=eta,
                       generator=torch.Generator().manual_seed(seed))


def sample_exact_flow(steps, init=None, strength=1.0, batch=2):
    config = vd.Config(objective="flow", image_size=4)
    return vd.generate(ExactVelocity(X_STAR), None, config, None, shape=(batch, 1, 4, 4),
                       guidance_scale=1.0, sampler="euler", steps=steps, init_images=init,
                       strength=strength, generator=torch.Generator().manual_seed(batch))


def assert_lands_on_x_star(out):
    close(out, X_STAR.expand_as(out), 1e-4)


@given(sampler=st.sampled_from(["ddim", "dpm"]), steps=st.integers(1, 60),
       prediction=st.sampled_from(["eps", "v"]), clip=st.booleans(), cond=st.booleans(),
       seed=st.integers(0, 2**16), eta=st.sampled_from([0.0, 0.5, 1.0]))
def test_ddim_and_dpm_solver_with_the_exact_denoiser_land_on_the_data_point(
        scheduler, sampler, steps, prediction, clip, cond, seed, eta):
    eta = eta if sampler == "ddim" else 0.0  # DDIM's fresh noise: the data point stays the answer
    assert_lands_on_x_star(sample_exact(scheduler, prediction=prediction, sampler=sampler,
                                        steps=steps, clip=clip, cond=cond, seed=seed, eta=eta))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_over_all_t_with_the_exact_denoiser_lands_on_the_data_point(scheduler, prediction,
                                                                        clip):
    # the last step (t = 0) adds no noise and its mean is x* itself; a loop that stopped at
    # t = 1 would leave noise of std √β_1 ≈ 0.01
    assert_lands_on_x_star(sample_exact(scheduler, prediction=prediction, sampler="ddpm",
                                        steps=T, clip=clip, cond=True, seed=3))


@given(strength=st.floats(0.001, 1.0), sampler=st.sampled_from(["ddim", "dpm", "ddpm"]),
       steps=st.integers(1, 30), prediction=st.sampled_from(["eps", "v"]), clip=st.booleans())
def test_img2img_with_the_exact_denoiser_lands_on_the_data_point_at_any_strength(
        scheduler, strength, sampler, steps, prediction, clip):
    init = -X_STAR.flip(-1).expand(2, 1, 4, 4)  # any other picture: the data set holds only x*
    steps = T if sampler == "ddpm" else steps
    assert_lands_on_x_star(sample_exact(scheduler, prediction=prediction, sampler=sampler,
                                        steps=steps, clip=clip, strength=strength, init=init,
                                        batch=2))


@given(batch=batch_sizes, steps=st.integers(1, 30))
def test_euler_with_the_exact_velocity_reaches_the_data_point(batch, steps):
    out = sample_exact_flow(steps, batch=batch)
    assert out.shape == (batch, 1, 4, 4)
    close(out, X_STAR.expand_as(out), 1e-5)


@given(strength=st.floats(0.001, 1.0), steps=st.integers(1, 30))
def test_euler_img2img_with_the_exact_velocity_lands_on_the_data_point(strength, steps):
    out = sample_exact_flow(steps, init=torch.zeros(2, 1, 4, 4), strength=strength)
    close(out, X_STAR.expand_as(out), 1e-5)


MU, S = 0.2, 0.3  # Gaussian data x0 ~ N(μ, s²·I)


class GaussianDenoiser(torch.nn.Module):
    """The exact ε-network for Gaussian data: x0_θ = μ + α·s²/(α²s² + σ²)·(x_t − α·μ), with
    α = √ᾱ_t, σ = √(1−ᾱ_t). Its probability-flow ODE keeps z = (x_t − α·μ)/√(α²s² + σ²) fixed,
    so the exact endpoint from x_T is μ + s·z: a known answer for the solvers' order."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        index = t.round().long()
        alpha = self.scheduler.sqrt_alpha_bar[index].double().reshape(-1, 1, 1, 1)
        sigma = self.scheduler.sqrt_one_minus_alpha_bar[index].double().reshape(-1, 1, 1, 1)
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x.double() - alpha * MU)
        return ((x.double() - alpha * x0) / sigma).float()


def gaussian_ode_error(scheduler, loop, steps, end=100):
    """The sampler loop on `steps` timesteps evenly spaced in log SNR from T−1 to `end`: the
    largest error of x_end against the exact probability-flow ODE solution."""
    shape = (64, 1, 4, 4)
    log_snr = vd.log_snr(scheduler)
    targets = torch.linspace(log_snr[T - 1].item(), log_snr[end].item(), steps)
    timesteps = torch.searchsorted(-log_snr.double(), -targets.double()).tolist()
    model = GaussianDenoiser(scheduler)
    denoise = lambda x, t: model(x, torch.full((len(x),), float(t)))
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    states = list(loop(denoise, scheduler, x_T, timesteps, False))  # the last jumps to x0
    alpha, sigma = scheduler.sqrt_alpha_bar.double(), scheduler.sqrt_one_minus_alpha_bar.double()
    z = (x_T.double() - alpha[T - 1] * MU) / (alpha[T - 1]**2 * S**2 + sigma[T - 1]**2).sqrt()
    exact = alpha[end] * MU + (alpha[end]**2 * S**2 + sigma[end]**2).sqrt() * z
    return (states[-2] - exact).abs().max().item()


def test_dpm_solver_is_second_order_and_beats_ddim_at_equal_steps(scheduler):
    dpm = {steps: gaussian_ode_error(scheduler, vd.dpm_solver_sampler, steps)
           for steps in (11, 21, 41)}
    ddim = {steps: gaussian_ode_error(scheduler, vd.ddim_sampler, steps) for steps in (11, 21)}
    assert ddim[21] < 0.6 * ddim[11]           # DDIM: first order, the error about halves
    assert dpm[41] < dpm[21] / 3               # 2M: second order, the error about quarters
    assert dpm[11] < ddim[21] / 1.4            # DPM-Solver++ 10 steps beat DDIM's 20


@given(t=st.integers(1, T - 1), t_next_fraction=st.floats(0, 0.99), seed=st.integers(0, 2**16))
def test_dpm_solver_first_order_step_is_the_ddim_step(scheduler, t, t_next_fraction, seed):
    _, _, x_t = noised_sample(scheduler, t, seed)
    pred_noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(seed + 1))
    t_next = math.floor(t_next_fraction * t)
    x0 = vd.predict_x0(scheduler, x_t, t, pred_noise)
    dpm, _ = vd.dpm_solver_step(scheduler, x_t, t, t_next, x0)
    close(dpm, vd.ddim_step(scheduler, x_t, t, t_next, pred_noise), 1e-3, 1e-4)


# ---------------------------------------------------------------------------------------------
# The σ view (II.13), the flow SDE (II.11), and the notes' other choices (II.2, II.14, I.2)
# ---------------------------------------------------------------------------------------------

SIGMA_LOOPS = {"euler": vd.euler_sigma_sampler, "heun": vd.heun_sampler,
               "dpm++2m": vd.dpmpp_2m_sampler}


def sigma_loop(name):
    """A σ sampler in the (denoise, scheduler, x, timesteps, clip) form of ddim_sampler."""
    def loop(denoise, scheduler, x, timesteps, clip_x0):
        denoiser = vd.SigmaDenoiser(denoise, scheduler, clip_x0)
        return SIGMA_LOOPS[name](denoiser, x, vd.sigma_schedule(scheduler, timesteps))
    return loop


def test_sigma_of_t_is_the_noise_to_signal_ratio_of_alpha_bar(scheduler):
    alpha_bar = linear_alpha_bar()
    close(vd.sigma_table(scheduler).double(), ((1 - alpha_bar) / alpha_bar).sqrt(), 0, 1e-5)
    for t in (0, 1, 500, T - 1):  # a table entry is its own nearest entry
        assert vd.nearest_timestep(scheduler, vd.sigma_table(scheduler)[t].item()) == t


@given(steps=st.integers(2, 40), rho=st.sampled_from([1.0, 3.0, 7.0]))
def test_karras_sigmas_run_from_max_to_min_evenly_in_sigma_to_the_one_over_rho(steps, rho):
    sigmas = torch.tensor(vd.karras_sigmas(steps, 0.02, 80.0, rho), dtype=torch.float64)
    assert len(sigmas) == steps
    close(sigmas[[0, -1]], torch.tensor([80.0, 0.02], dtype=torch.float64), 0, 1e-12)
    gaps = sigmas.pow(1 / rho).diff()                      # σ^{1/ρ} falls by equal steps
    close(gaps, gaps[:1].expand_as(gaps), 1e-12)
    assert (sigmas.diff() < 0).all()


def test_karras_timesteps_start_at_the_top_and_end_at_sigma_min(scheduler):
    timesteps = vd.karras_timesteps(scheduler, 15, T - 1, vd.sigma_table(scheduler)[0].item())
    assert timesteps[0] == T - 1 and timesteps[-1] == 0 and len(timesteps) == 15
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


class CurvedDenoiser(torch.nn.Module):
    """A made-up ε-network that depends on x and t non-linearly: a stand-in with no shortcut."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        return torch.tanh(1.5 * x + t.reshape(-1, 1, 1, 1) / T) - 0.3 * x.roll(1, dims=-1)


@given(steps=st.integers(1, 30), clip=st.booleans(), seed=st.integers(0, 2**16))
def test_euler_in_sigma_is_ddim_on_the_same_timesteps(scheduler, steps, clip, seed):
    """Karras et al. 2022, §3: DDIM (η = 0) is Euler's method on dx/dσ."""
    model, timesteps = CurvedDenoiser(), vd.sampling_timesteps(T - 1, steps)
    denoise = vd.Denoiser(model, scheduler, vd.Config(prediction="eps"))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    ddim = list(vd.ddim_sampler(denoise, scheduler, x, timesteps, clip))
    euler = list(sigma_loop("euler")(denoise, scheduler, x, timesteps, clip))
    for a, b in zip(ddim, euler):
        close(b, a, 1e-4, 1e-4)


def test_dpmpp_2m_in_sigma_is_the_dpm_solver_of_ii7_on_the_same_timesteps(scheduler):
    model, timesteps = CurvedDenoiser(), vd.sampling_timesteps(T - 1, 12)
    denoise = vd.Denoiser(model, scheduler, vd.Config(prediction="eps"))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    dpm = list(vd.dpm_solver_sampler(denoise, scheduler, x, timesteps, True))
    sigma = list(sigma_loop("dpm++2m")(denoise, scheduler, x, timesteps, True))
    for a, b in zip(dpm, sigma):
        close(b, a, 1e-4, 1e-4)


@pytest.mark.parametrize("noisy, plain", [(vd.euler_ancestral_sampler, vd.euler_sigma_sampler),
                                          (vd.dpmpp_2m_sde_sampler, vd.dpmpp_2m_sampler)])
def test_the_noisy_sigma_samplers_with_their_noise_off_are_their_deterministic_twins(
        scheduler, noisy, plain):
    denoiser = vd.SigmaDenoiser(vd.Denoiser(CurvedDenoiser(), scheduler,
                                            vd.Config(prediction="eps")), scheduler)
    sigmas = vd.sigma_schedule(scheduler, vd.sampling_timesteps(T - 1, 10))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    off = list(noisy(denoiser, x, sigmas, eta=0.0, generator=torch.Generator().manual_seed(2)))
    for a, b in zip(list(plain(denoiser, x, sigmas)), off):
        close(b, a, 1e-5, 1e-5)
    on = list(noisy(denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(2)))
    assert (on[0] - off[0]).abs().max() > 1e-3  # η = 1 does add noise


@given(sigma=st.floats(0.01, 100), fraction=st.floats(0, 0.999), eta=st.floats(0, 1))
def test_the_ancestral_step_splits_the_next_noise_level_into_down_and_up(sigma, fraction, eta):
    sigma_next = fraction * sigma
    down, up = vd.ancestral_step(sigma, sigma_next, eta)
    assert math.isclose(down**2 + up**2, sigma_next**2, rel_tol=1e-9, abs_tol=1e-12)
    assert 0 <= up <= sigma_next and (eta > 0 or up == 0)


@given(t=st.integers(1, T - 1), fraction=st.floats(0, 0.99))
def test_euler_a_adds_the_fresh_noise_of_ddim_at_eta_1_in_the_sigma_scale(scheduler, t,
                                                                           fraction):
    """σ_up at η = 1 is DDPM's posterior noise σ = √((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev),
    divided by √ᾱ_prev to move it into x = x_t/√ᾱ."""
    t_prev = math.floor(fraction * t)
    alpha_bar = linear_alpha_bar()
    a, p = alpha_bar[t].item(), alpha_bar[t_prev].item()
    ddim_sigma = math.sqrt((1 - p) / (1 - a)) * math.sqrt(1 - a / p)
    sigmas = vd.sigma_table(scheduler).double()
    _, up = vd.ancestral_step(sigmas[t].item(), sigmas[t_prev].item(), 1.0)
    assert math.isclose(up, ddim_sigma / math.sqrt(p), rel_tol=1e-3)


def test_heun_is_second_order_and_euler_first_on_gaussian_data(scheduler):
    euler = {n: gaussian_ode_error(scheduler, sigma_loop("euler"), n) for n in (11, 21)}
    heun = {n: gaussian_ode_error(scheduler, sigma_loop("heun"), n) for n in (11, 21, 41)}
    assert euler[21] < 0.6 * euler[11]           # Euler: first order, the error about halves
    assert heun[41] < heun[21] / 3               # Heun: second order, the error about quarters
    assert heun[21] < euler[21] / 3


@given(sampler=st.sampled_from([f"{name}{suffix}" for name in vd.SIGMA_SAMPLERS
                                for suffix in ("", "-karras")]),
       steps=st.integers(1, 40), prediction=st.sampled_from(["eps", "v"]), clip=st.booleans(),
       cond=st.booleans(), seed=st.integers(0, 2**16))
def test_every_sigma_sampler_with_the_exact_denoiser_lands_on_the_data_point(
        scheduler, sampler, steps, prediction, clip, cond, seed):
    assert_lands_on_x_star(sample_exact(scheduler, prediction=prediction, sampler=sampler,
                                        steps=steps, clip=clip, cond=cond, seed=seed))


def test_heun_counts_its_network_evaluations_honestly(scheduler):
    calls = []
    model = ExactDenoiser(X_STAR, scheduler, "eps")
    counting = lambda x, t, labels=None: calls.append(1) or model(x, t, labels)
    counting.parameters = model.parameters
    for steps in (1, 2, 9, 10):
        calls.clear()
        vd.generate(counting, scheduler, vd.Config(image_size=4, prediction="eps"), None,
                    shape=(1, 1, 4, 4), guidance_scale=1.0, sampler="heun", steps=steps)
        assert len(calls) == vd.network_evaluations("heun", steps) <= steps


@given(a=st.floats(0.1, 2.0), steps=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_flow_sde_at_a_0_is_euler_and_any_a_lands_on_a_one_image_data_set(a, steps, seed):
    denoise = lambda x, t: ExactVelocity(X_STAR)(x, torch.full((len(x),), float(t)))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    s_grid = torch.linspace(1, 0, steps + 1).tolist()
    euler = list(vd.euler_sampler(denoise, x, s_grid, T))
    sde_0 = list(vd.flow_sde_sampler(denoise, x, s_grid, T, 0.0, torch.Generator()))
    assert all(torch.equal(e, s) for e, s in zip(euler, sde_0))
    sde = list(vd.flow_sde_sampler(denoise, x, s_grid, T, a, torch.Generator().manual_seed(1)))
    assert_lands_on_x_star(sde[-1])


def test_flow_sde_step_drift_is_the_ode_minus_half_sigma_squared_times_the_score():
    """With z = 0 the step is x + [v − σ²/2·∇log p_s]·ds, ∇log p_s = −(x + (1−s)·v)/s."""
    x, v = torch.randn(4), torch.randn(4)
    s, s_next, a = 0.6, 0.5, 0.8
    sigma2 = a**2 * s / (1 - s)
    score = -(x + (1 - s) * v) / s
    expected = x + (v - sigma2 / 2 * score) * (s_next - s)
    close(vd.flow_sde_step(x, s, s_next, v, a, torch.zeros(4)), expected, 1e-6)


def test_cosine_schedule_matches_its_closed_form_and_clips_beta_at_0999():
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    scheduler = vd.scheduler_for(vd.Config(schedule="cosine"))
    alpha_bar = scheduler.alpha_bar.double()
    for t in (0, 10, 500, 990):  # ᾱ_t = f((t+1)/T)/f(0): t counts from 0 here
        assert math.isclose(alpha_bar[t].item(), f((t + 1) / T) / f(0), rel_tol=1e-5)
    betas = vd.cosine_betas(T)
    assert betas.max() == 0.999 and (betas[:-1] < 0.999).all()   # only the last is clipped
    assert (betas > 0).all() and (alpha_bar.diff() < 0).all()


@given(t=timesteps, seed=st.integers(0, 2**16))
def test_x0_target_converts_to_the_true_noise_and_back(scheduler, t, seed):
    x0, noise, x_t = noised_sample(scheduler, t, seed)
    assert torch.equal(vd.training_target(scheduler, x0, t, noise, "x0"), x0)
    pred_noise = vd.noise_from_output(scheduler, x_t, t, x0, "x0")
    close(pred_noise, noise, 2e-2 if t < 5 else 1e-3)  # ÷ √(1−ᾱ_t): float32 at small t
    close(vd.predict_x0(scheduler, x_t, t, pred_noise), x0, 1e-4)


def test_the_posterior_variance_is_the_variance_of_q_x_prev_given_x_t_and_x0(scheduler):
    alpha_bar = linear_alpha_bar()
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = 1 - alpha_bar / alpha_bar_prev
    expected = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas       # Ho et al., eq. 7
    close(scheduler.posterior_variance.double(), expected, 1e-9, 1e-4)
    x, pred_noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for t in (0, 1, 600):  # one z for both draws: they differ by (√β̃_t − √β_t)·z, none at t = 0
        draw = lambda variance: scheduler.sample_prev_image_distribution(
            x, t, pred_noise, torch.Generator().manual_seed(3), variance)
        gap = (expected[t].sqrt() - betas[t].sqrt()).float() * z * (t > 0)
        close(draw("posterior") - draw("beta"), gap, 1e-6)


@pytest.mark.parametrize("t", [0, 9, 99, 499])
def test_t_single_steps_of_the_markov_chain_give_the_jump_of_noise_image(scheduler, t):
    n, x0 = 20000, torch.tensor(0.7)
    generator = torch.Generator().manual_seed(t)
    x = x0.expand(n).clone()
    for step in range(t + 1):  # steps 0 … t: q(x_step | x_{step−1}) each
        x = scheduler.noise_step(x, step, torch.randn(n, generator=generator))
    mean, std = scheduler.sqrt_alpha_bar[t] * x0, scheduler.sqrt_one_minus_alpha_bar[t]
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(x.var() / std**2 - 1) < 5 * math.sqrt(2 / n)


def test_guidance_applies_inside_its_interval_only_endpoints_included():
    model = randomized(vd.build_network(tiny_config()))
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 5])
    denoise = vd.Denoiser(model, vd.NoiseScheduler(T), tiny_config(prediction="eps"), labels,
                          guidance_scale=4.0, guidance_interval=(0.2, 0.6))
    low, high = round(0.2 * (T - 1)), math.floor(0.6 * (T - 1))
    scales = [vd.guidance_at(t, T, 4.0, (0.2, 0.6)) for t in (low - 1, low, high, high + 1)]
    assert scales == [1, 4, 4, 1]
    t_batch = torch.full((2,), float(high + 1))
    close(denoise(x, high + 1), model(x, t_batch, labels), 1e-6)  # outside: plain conditional
    t_batch = torch.full((2,), float(high))
    guided = vd.guided_prediction(model, x, t_batch, labels, 4.0)
    close(denoise(x, high), guided, 1e-6)


def test_autoguidance_extrapolates_from_the_guide_like_cfg():
    config = tiny_config(cond=False)
    model = randomized(vd.build_network(config))
    guide = randomized(vd.build_network(config), seed=1)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10.0, 900.0])
    strong, weak = model(x, t, None), guide(x, t, None)
    for w in (0.0, 1.0, 2.5):
        close(vd.guided_prediction(model, x, t, None, w, guide=guide), weak + w * (strong - weak),
              1e-5)


def test_generate_records_one_frame_per_step(scheduler):
    frames = []
    config = vd.Config(image_size=4)
    vd.generate(ExactDenoiser(X_STAR, scheduler, "v"), scheduler, config, None,
                shape=(1, 1, 4, 4), guidance_scale=1.0, sampler="ddim", steps=7, frames=frames)
    assert len(frames) == 7 and torch.allclose(frames[-1], X_STAR, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Classifier guidance (II.9)
# ---------------------------------------------------------------------------------------------

class LinearSoftmax(torch.nn.Module):
    """Known in closed form: logits = W·x + b, so ∇_x log p(y | x) = W_y − Σ_k p_k·W_k."""

    def __init__(self, pixels=16, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(10, pixels, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(10, generator=generator))

    def forward(self, x, t):
        return x.flatten(1) @ self.weight.T + self.bias                   # [B, 10]


def test_classifier_gradient_is_the_closed_form_gradient_of_log_softmax():
    classifier = LinearSoftmax()
    x, labels = torch.randn(5, 1, 4, 4), torch.tensor([0, 3, 3, 9, 1])
    gradient = vd.classifier_gradient(classifier, x, torch.full((5,), 500.0), labels)
    with torch.no_grad():
        p = classifier(x, None).softmax(-1)                                  # [B, 10]
        expected = classifier.weight[labels] - p @ classifier.weight         # W_y − Σ_k p_k W_k
    close(gradient, expected.reshape(x.shape), 1e-5, 1e-5)


@given(t=timesteps, scale=st.floats(0, 10))
def test_classifier_guidance_shifts_the_score_as_its_formulas_say(scheduler, t, scale):
    classifier, x = LinearSoftmax(), torch.randn(3, 1, 4, 4)
    labels, pred_noise = torch.tensor([1, 2, 3]), torch.randn(3, 1, 4, 4)
    guide = vd.ClassifierGuide(classifier, scheduler, labels, scale)
    gradient = vd.classifier_gradient(classifier, x, torch.full((3,), float(t)), labels)
    # ε̂ = ε − s·√(1−ᾱ_t)·g: the score −ε/√(1−ᾱ_t) moves by exactly s·g
    guided = guide.noise(x, t, pred_noise)
    score_shift = -(guided - pred_noise) / scheduler.sqrt_one_minus_alpha_bar[t]
    close(score_shift, scale * gradient, 1e-4, 1e-4)
    close(guide.mean_shift(x, t), scale * scheduler.betas[t] * gradient, 1e-7, 1e-5)  # s·σ_t²·g


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "euler", "euler-a", "heun",
                                     "dpm++2m-karras", "dpm++2m-sde"])
def test_classifier_guidance_at_scale_0_is_the_unguided_sampler_and_otherwise_acts(
        scheduler, sampler):
    config = vd.Config(image_size=4, prediction="eps")
    model = ExactDenoiser(X_STAR, scheduler, "eps")
    labels = torch.tensor([4, 7])

    def draw(**guidance):
        return vd.generate(model, scheduler, config, labels, shape=(2, 1, 4, 4),
                           guidance_scale=1.0, sampler=sampler, steps=5,
                           generator=torch.Generator().manual_seed(0), **guidance)

    unguided = draw()
    assert torch.equal(draw(classifier=LinearSoftmax(), classifier_scale=0.0), unguided)
    assert not torch.allclose(draw(classifier=LinearSoftmax(), classifier_scale=3.0), unguided)


def test_ddpm_with_classifier_guidance_is_the_unguided_step_plus_the_mean_shift(scheduler):
    classifier, t, labels = LinearSoftmax(), 600, torch.tensor([5, 6])
    x_t, pred_noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    guide = vd.ClassifierGuide(classifier, scheduler, labels, 2.0)
    loop = vd.ddpm_sampler(lambda x, step: pred_noise, scheduler, x_t, t,
                           torch.Generator().manual_seed(3), clip_x0=False,
                           mean_shift=guide.mean_shift)
    unguided = scheduler.sample_prev_image_distribution(x_t, t, pred_noise,
                                                        torch.Generator().manual_seed(3))
    close(next(loop), unguided + guide.mean_shift(x_t, t), 1e-6)


class RecordingClassifier(torch.nn.Module):
    """Uniform logits (loss log 10), and a memory of what it was shown."""

    def forward(self, x, t):
        self.inputs = (x, t)
        return torch.zeros(len(x), 10, requires_grad=True)


def test_the_noisy_classifier_learns_from_noise_image_at_t_drawn_over_the_schedule(scheduler,
                                                                                   monkeypatch):
    seen, real_noise_image = {}, scheduler.noise_image

    def spy(x0, t, noise=None):
        seen["x0"], seen["t"] = x0, t
        seen["x_t"] = real_noise_image(x0, t, noise)[0]
        return seen["x_t"], noise

    monkeypatch.setattr(scheduler, "noise_image", spy)
    classifier = RecordingClassifier()
    x0, labels = torch.rand(4000, 1, 2, 2) * 2 - 1, torch.randint(0, 10, (4000,))
    loss, t = vd.noisy_classifier_loss(classifier, scheduler, x0, labels,
                                       torch.Generator().manual_seed(0))
    assert classifier.inputs[0] is seen["x_t"] and classifier.inputs[1] is seen["t"] is t
    assert seen["x0"] is x0 and loss.item() == pytest.approx(math.log(10))
    shares = torch.bincount(t // (T // 10), minlength=10).double() / len(t)  # t ~ U{0, …, T−1}
    assert (shares - 0.1).abs().max() <= 5 * math.sqrt(0.1 * 0.9 / len(t))


# ---------------------------------------------------------------------------------------------
# Rectified flow and the training losses
# ---------------------------------------------------------------------------------------------

def test_flow_interpolation_endpoints_are_data_and_noise():
    x0, noise = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(vd.flow_interpolate(x0, torch.zeros(3), noise), x0)
    torch.testing.assert_close(vd.flow_interpolate(x0, torch.ones(3), noise), noise)


class Recorder(torch.nn.Module):
    """Returns zeros and remembers its input, so the loss is a known function of that input."""

    def forward(self, x, t, labels):
        self.inputs = (x, t)
        return torch.zeros_like(x)


def test_flow_training_target_is_noise_minus_x0():
    config = vd.Config(objective="flow", cond=False)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    model = Recorder()
    per_image, s = vd.training_loss(model, None, x0, None, config)
    x_s, t = model.inputs
    torch.testing.assert_close(t, s * (T - 1))
    s = s.reshape(-1, 1, 1, 1)
    noise = (x_s - (1 - s) * x0) / s  # invert x_s = (1−s)·x0 + s·ε
    close(per_image, (noise - x0).pow(2).mean(dim=(1, 2, 3)), 1e-4, 1e-4)


class ExactFlowVelocity(torch.nn.Module):
    """Knows the clean batch x0, so it outputs the true velocity ε − x0 = (x_s − x0)/s."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, t, labels=None):
        s = (t / (T - 1)).reshape(-1, 1, 1, 1)
        return (x - self.x0) / s


def test_flow_loss_of_the_true_velocity_is_zero():
    config = vd.Config(objective="flow", cond=False)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    per_image, _ = vd.training_loss(ExactFlowVelocity(x0), None, x0, None, config,
                                    torch.Generator().manual_seed(0))
    assert per_image.max().item() < 1e-6  # the target is ε − x0, not x0 − ε


def test_ddim_eta_adds_fresh_noise_and_eta_0_is_deterministic(scheduler):
    config = tiny_config(prediction="eps")
    model, noise = randomized(vd.build_network(config), std=0.05), torch.randn(2, 1, 28, 28)

    def draw(eta, seed):
        return vd.generate(model, scheduler, config, torch.tensor([1, 2]), shape=noise.shape,
                           guidance_scale=1.0, sampler="ddim", steps=5, eta=eta, noise=noise,
                           generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0.0, 1), draw(0.0, 2))
    assert not torch.allclose(draw(1.0, 1), draw(1.0, 2))


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_training_loss_weights_match_their_closed_forms(scheduler, prediction, gamma):
    config = vd.Config(prediction=prediction, min_snr_gamma=gamma, cond=False)
    x0 = torch.rand(256, 1, 4, 4) * 2 - 1
    model = Recorder()
    per_image, _ = vd.training_loss(model, scheduler, x0, None, config,
                                    torch.Generator().manual_seed(0))
    x_t, t = model.inputs
    sqrt_alpha_bar = scheduler.sqrt_alpha_bar[t].reshape(-1, 1, 1, 1)
    sqrt_one_minus = scheduler.sqrt_one_minus_alpha_bar[t].reshape(-1, 1, 1, 1)
    noise = (x_t - sqrt_alpha_bar * x0) / sqrt_one_minus
    target = noise if prediction == "eps" else sqrt_alpha_bar * noise - sqrt_one_minus * x0
    snr = scheduler.alpha_bar[t] / (1 - scheduler.alpha_bar[t])
    weight = torch.ones_like(snr)
    if gamma > 0:  # min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
        weight = torch.minimum(snr, torch.tensor(gamma)) / (snr if prediction == "eps" else snr + 1)
    close(per_image, weight * target.pow(2).mean(dim=(1, 2, 3)), 1e-6, 1e-3)


@pytest.mark.parametrize("mean, std", [(-2.0, 2.0), (0.0, 1.0), (3.0, 0.5)])
def test_logsnr_sampling_draws_log_snr_from_its_normal(scheduler, mean, std):
    """t is the first timestep whose log SNR is at most a draw z ~ N(μ, σ²), so
    P(log SNR_t ≤ log SNR_k) = P(z < log SNR_{k−1}) = Φ((log SNR_{k−1} − μ)/σ), exactly."""
    config = vd.Config(t_sampling="logsnr", logsnr_mean=mean, logsnr_std=std)
    n = 200_000
    t = vd.sample_timesteps(scheduler, n, config, torch.Generator().manual_seed(0))
    alpha_bar = linear_alpha_bar()
    log_snr = (alpha_bar / (1 - alpha_bar)).log()
    normal = torch.distributions.Normal(mean, std)
    for k in range(1, T, 37):
        expected = normal.cdf(log_snr[k - 1]).item()
        observed = (t >= k).double().mean().item()  # log SNR falls in t: t ≥ k ⇔ below
        assert abs(observed - expected) <= 5 * math.sqrt(expected * (1 - expected) / n) + 1e-6


def test_uniform_sampling_gives_every_timestep_the_same_share(scheduler):
    config = vd.Config(t_sampling="uniform")
    n = 200_000
    t = vd.sample_timesteps(scheduler, n, config, torch.Generator().manual_seed(0))
    p = 1 / 10  # each tenth of the T timesteps
    shares = torch.bincount(t // (T // 10), minlength=10).double() / n
    assert (shares - p).abs().max() <= 5 * math.sqrt(p * (1 - p) / n)


def test_training_loss_draws_all_its_randomness_from_the_generator(scheduler):
    config = tiny_config()
    model = randomized(vd.build_network(config))
    x0, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)

    def loss(seed):
        torch.manual_seed(seed)  # the global generator must not matter
        return vd.training_loss(model, scheduler, x0, labels, config,
                                torch.Generator().manual_seed(5))[0]

    assert torch.equal(loss(1), loss(2))


# ---------------------------------------------------------------------------------------------
# The DiT
# ---------------------------------------------------------------------------------------------

@given(batch=batch_sizes, patch=st.sampled_from([1, 2, 4, 7, 14]), channels=st.integers(1, 3))
def test_patchify_then_unpatchify_is_the_identity(batch, patch, channels):
    images = torch.randn(batch, channels, 28, 28)
    tokens = vd.patchify(images, patch)
    assert tokens.shape == (batch, (28 // patch) ** 2, channels * patch * patch)
    assert torch.equal(vd.unpatchify(tokens, patch, channels), images)
    second_patch = images[:, :, :patch, patch:2 * patch]  # token 1: row 0, column 1
    assert torch.equal(tokens[:, 1].reshape(batch, channels, patch, patch), second_patch)


@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.parametrize("conv_channels", [0, 8])
def test_dit_output_shape_equals_input_shape(device, cond, conv_channels):
    config = tiny_config(cond=cond, conv_channels=conv_channels)
    model = randomized(vd.build_network(config)).to(device)
    for batch in (1, 3):
        x = torch.randn(batch, 1, 28, 28, device=device)
        labels = torch.randint(0, 11, (batch,), device=device) if cond else None
        out = model(x, torch.randint(0, T, (batch,), device=device), labels)
        assert out.shape == x.shape and out.device == x.device


@pytest.mark.parametrize("conv_channels", [0, 8])
def test_dit_starts_by_predicting_zero(conv_channels):
    model = vd.build_network(tiny_config(conv_channels=conv_channels))
    out = model(torch.randn(2, 1, 28, 28), torch.tensor([3, 900]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: the last layer starts at zero


def test_changing_the_label_changes_the_output(device):
    model = randomized(vd.build_network(tiny_config())).to(device)
    x = torch.randn(1, 1, 28, 28, device=device).expand(11, 1, 28, 28)
    t = torch.full((11,), 500, device=device)
    out = model(x, t, torch.arange(11, device=device))  # digits 0-9 and ∅
    differences = (out[:, None] - out[None]).abs().flatten(2).amax(-1)  # [11, 11]
    assert (differences + torch.eye(11, device=device) > 1e-3).all()


def test_cross_attention_has_several_keys_and_weights_that_depend_on_the_image_token():
    model = randomized(vd.build_network(tiny_config()))
    attention, captured = model.blocks[0].cross_attn, {}
    attention.register_forward_hook(
        lambda module, inputs, output: captured.update(inputs=inputs, output=output))
    model(torch.randn(2, 1, 28, 28), torch.tensor([10, 700]), torch.tensor([3, 10]))
    queries, context = captured["inputs"]
    assert context.shape[1] >= 2  # one key: softmax ≡ 1, an added bias that ignores the image
    weights = vd.attention_weights(attention, queries, context)  # [B, heads, N, M]
    assert weights.shape == (2, 2, 49, context.shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 49))
    assert weights.std(dim=2).amax() > 1e-2  # image tokens attend differently
    _, _, values = attention.project(queries, context)  # SDPA is exactly softmax(QKᵀ/√d)·V
    expected = attention.out((weights @ values).transpose(1, 2).flatten(2))
    close(captured["output"], expected, 1e-5, 1e-4)


def test_null_label_is_a_real_embedding_row_and_unconditional_model_ignores_labels():
    model = randomized(vd.build_network(tiny_config()))
    assert model.label_embed.num_embeddings == 11
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 100])
    null_out = model(x, t, torch.full((2,), vd.NULL_LABEL))
    assert torch.isfinite(null_out).all()
    assert not torch.allclose(null_out, model(x, t, torch.tensor([4, 4])))
    unconditional = randomized(vd.build_network(tiny_config(cond=False)))
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

def test_guidance_scale_1_is_conditional_0_is_unconditional_and_negative_fills_uncond(device):
    model = randomized(vd.build_network(tiny_config())).to(device)
    x = torch.randn(3, 1, 28, 28, device=device)
    t, labels = torch.tensor([5, 400, 999], device=device), torch.tensor([1, 4, 7], device=device)
    cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, vd.NULL_LABEL))
    atol = 1e-5 * cond.abs().max().item()  # batched against not: float32 rounding, times depth
    guided = lambda w, negative=None: vd.guided_prediction(model, x, t, labels, w, negative)
    close(guided(1.0), cond, atol)
    close(guided(0.0), uncond, atol)
    close(guided(3.0), uncond + 3 * (cond - uncond), atol)
    negative = torch.tensor([2, 2, 2], device=device)
    close(guided(0.0, negative), model(x, t, negative), atol)


# ---------------------------------------------------------------------------------------------
# Training, checkpoints, image-to-image, evaluation
# ---------------------------------------------------------------------------------------------

def synthetic_digits(n):
    """Bright bars at a label-dependent row on a dark background, in [−1, 1]: easy to learn."""
    labels = torch.arange(n) % 10
    images = -torch.ones(n, 1, 28, 28)
    for i, label in enumerate(labels.tolist()):
        images[i, 0, 2 + 2 * label:5 + 2 * label, 4:24] = 1
    return images, labels


def test_a_few_dozen_training_steps_lower_the_loss(device):
    config = tiny_config(lr=3e-3, warmup_steps=5)
    run, scheduler = vd.start_run(config, device, seed=0)
    images, labels = (tensor.to(device) for tensor in synthetic_digits(64))

    def loss(generator):
        return vd.training_loss(run.model, scheduler, images, labels, config, generator)[0].mean()

    def fixed_loss():  # the same t and ε each time, so before and after are comparable
        with torch.no_grad():
            return loss(torch.Generator(device).manual_seed(123)).item()

    before = fixed_loss()
    for step in range(40):
        vd.set_learning_rate(run.optimizer, vd.learning_rate(step, 40, config))
        run.optimizer.zero_grad()
        loss(run.generator).backward()
        run.optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_learning_rate_warms_up_then_decays_to_zero():
    config = vd.Config(lr=1e-3, warmup_steps=10)
    rates = [vd.learning_rate(step, 100, config) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[100] == pytest.approx(0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Part I alone, and Part II reducing to it
# ---------------------------------------------------------------------------------------------

def part_one_source():
    """The file from its top to the `# Part II` banner."""
    lines = open(os.path.join(HERE, "vanilla_diffusion.py"), encoding="utf-8").read().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("# Part II"))
    return "\n".join(lines[:end])


def test_part_one_alone_trains_and_samples_a_complete_model():
    part_one = {"__name__": "part_one"}
    assert len(part_one_source().splitlines()) < 450  # readable in one sitting
    exec(compile(part_one_source(), "part_one", "exec"), part_one)
    assert "ConvDiT" not in part_one and "generate" not in part_one  # nothing from later parts
    config = part_one["Config"](cond=True, width=32, depth=2, heads=2, label_tokens=2)
    torch.manual_seed(0)
    model, scheduler = part_one["DiT"](config), part_one["NoiseScheduler"](T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = synthetic_digits(64)

    def fixed_loss():  # the same t, ε and label dropout each time
        with torch.no_grad():
            return part_one["ddpm_loss"](model, scheduler, images, labels, 0.1,
                                         torch.Generator().manual_seed(123))[0].mean().item()

    before, generator = fixed_loss(), torch.Generator().manual_seed(0)
    for step in range(40):
        batch = torch.arange(16) + 16 * (step % 4)
        loss = part_one["ddpm_loss"](model, scheduler, images[batch], labels[batch], 0.1,
                                     generator)[0].mean()
        part_one["train_step"](model, optimizer, loss)
    assert fixed_loss() < 0.7 * before
    samples = part_one["sample_ddpm_cfg"](model.eval(), scheduler, torch.tensor([1, 7]), 2.0,
                                          (2, 1, 28, 28), torch.Generator().manual_seed(0))
    assert samples.shape == (2, 1, 28, 28) and torch.isfinite(samples).all()


# ---------------------------------------------------------------------------------------------
# Lifting: each section runs with exactly what its banner's "Needs:" line names
# ---------------------------------------------------------------------------------------------

def file_sections():
    """{'I.2': (position, source, needs)}: each numbered section of Parts I and II, from its
    banner to the next one, and the sections and imports its "Needs:" line names."""
    import re
    lines = open(os.path.join(HERE, "vanilla_diffusion.py"), encoding="utf-8").read().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"# I{1,2}\.\d+ ", line)]
    part_three = next(i for i, line in enumerate(lines) if line.startswith("# Part III"))
    sections = {}
    for k, start in enumerate(starts):
        end = min(starts[k + 1] - 1 if k + 1 < len(starts) else part_three, part_three)
        end = next((i for i in range(start, end) if lines[i].startswith("# ====")), end)
        body = lines[start - 1:end]
        banner_end = next(i for i in range(1, len(body)) if body[i].startswith("# ---"))
        banner = " ".join(line.lstrip("# ") for line in body[:banner_end])
        needs = banner.split("Needs:")[1] if "Needs:" in banner else ""
        needs = re.match(r"(?:`[^`]*`|[^`.]|\.(?=\S))*", needs).group(0)  # to the first ". "
        refs = []
        for part, low, high in re.findall(r"\b(I{1,2})\.(\d+)(?:–I{1,2}\.(\d+))?", needs):
            refs += [f"{part}.{n}" for n in range(int(low), int(high or low) + 1)]
        imports = re.findall(r"`((?:import|from) [^`]+)`", needs)
        name = re.match(r"# (I{1,2}\.\d+) ", lines[start]).group(1)
        sections[name] = (start, "\n".join(body), refs, imports)
    return sections


def lifted(*names):
    """A fresh namespace holding `import torch`, the named sections, and the sections and imports
    their banners name (not what those name in turn: a banner names everything)."""
    sections = file_sections()
    wanted = set(names) | {ref for name in names for ref in sections[name][2]}
    namespace = {"__name__": "lifted"}
    imports = {line for name in wanted for line in sections[name][3]}
    exec("import torch\n" + "\n".join(sorted(imports)), namespace)
    for name in sorted(wanted, key=lambda name: sections[name][0]):  # in the file's order
        exec(compile(sections[name][1], name, "exec"), namespace)
    return namespace


def free_globals(source):
    """The global names a piece of source reads (builtins aside), by Python's symbol tables."""
    import builtins
    import symtable
    top = symtable.symtable(source, "section", "exec")
    used, tables = set(), [top]
    while tables:
        table = tables.pop()
        used |= {symbol.get_name() for symbol in table.get_symbols() if symbol.is_referenced()
                 and (table is top or symbol.is_global())}
        tables += table.get_children()
    return used - set(dir(builtins))


def test_every_banner_names_what_its_copy_needs_transitively():
    """Each section has a Needs: line, naming only sections above it, and holding what those
    name in turn: a reader copies from the banner alone."""
    sections = file_sections()
    for name, (_, _, refs, imports) in sections.items():
        assert all(ref in sections and sections[ref][0] < sections[name][0] for ref in refs), \
            f"{name} needs a section that is not above it: {refs}"
        for ref in refs:
            missing = set(sections[ref][2]) - set(refs)
            missing |= set(sections[ref][3]) - set(imports) - {"import torch"}
            assert not missing, f"{name} needs {ref}, which needs {sorted(missing)} too"
        banner = sections[name][1].split("\n# ---")[0]
        assert "Needs:" in banner, f"{name} has no Needs: line"


@pytest.mark.parametrize("name", list(file_sections()))
def test_each_section_runs_with_exactly_what_its_banner_names(name):
    """Statically: every global the section reads is defined by a section or an import its
    banner names (or by itself, or a builtin); then the lift executes."""
    sections = file_sections()
    _, source, refs, imports = sections[name]
    namespace = lifted(name)
    used = free_globals(source)
    unresolved = sorted(used - set(namespace))
    assert not unresolved, f"{name} reads {unresolved}, which its Needs: line does not name"
    for ref in refs:
        assert not free_globals(sections[ref][1]) - set(namespace), ref


@pytest.mark.parametrize("section, make_loop", [
    ("II.6", lambda ns, denoise, sch, x: ns["ddpm_sampler"](denoise, sch, x, 30)),
    ("II.7", lambda ns, denoise, sch, x: ns["ddim_sampler"](denoise, sch, x, [999, 500, 100])),
    ("II.8", lambda ns, denoise, sch, x: ns["dpm_solver_sampler"](denoise, sch, x,
                                                                   [999, 500, 100])),
    *[("II.13", lambda ns, denoise, sch, x, loop=loop: ns[loop](
        ns["SigmaDenoiser"](denoise, sch), x, ns["sigma_schedule"](sch, [999, 500, 100])))
      for loop in ("euler_sigma_sampler", "euler_ancestral_sampler", "heun_sampler",
                   "dpmpp_2m_sampler", "dpmpp_2m_sde_sampler")],
    ("II.10", lambda ns, denoise, sch, x: ns["euler_sampler"](denoise, x, [1.0, 0.5, 0.0], T)),
    ("II.11", lambda ns, denoise, sch, x: ns["flow_sde_sampler"](denoise, x, [1.0, 0.5, 0.0],
                                                                 T, 0.7)),
])
def test_each_part_two_sampler_lifts_alone_and_samples_from_a_tiny_dit(section, make_loop):
    """The sampler's section, II.5's Denoiser and I.3's DiT, with what their banners name, in a
    namespace of their own: the same images as the whole file draws."""
    flow = section in ("II.10", "II.11")
    objective = "flow" if flow else "eps"
    outputs = []
    for ns in (lifted(section, "II.5", "I.3"), vars(vd)):
        config = ns["Config"](cond=True, width=32, depth=2, heads=2, label_tokens=2,
                              objective=objective)
        torch.manual_seed(0)
        model = randomized(ns["DiT"](config), std=0.05)
        scheduler = ns["NoiseScheduler"](T)
        denoise = ns["Denoiser"](model, scheduler, config, torch.tensor([3, 7]), 2.0)
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # the noisy samplers' fresh noise, drawn without a generator
        outputs.append(list(make_loop(ns, denoise, scheduler, x))[-1])
    assert outputs[0].shape == (2, 1, 28, 28) and torch.isfinite(outputs[0]).all()
    close(outputs[0], outputs[1], 1e-5)


def test_part_ones_sampler_takes_any_callable_network():
    scheduler = vd.NoiseScheduler(20)
    zero_noise = lambda x, t, labels=None: torch.zeros_like(x)   # no parameters at all
    out = vd.sample_ddpm_cfg(zero_noise, scheduler, torch.tensor([1]), 1.5, (1, 1, 4, 4),
                             torch.Generator().manual_seed(0))
    assert out.shape == (1, 1, 4, 4) and torch.isfinite(out).all()


def test_part_two_loss_with_eps_and_uniform_t_is_part_one_loss_bit_for_bit(scheduler):
    config = tiny_config(prediction="eps", t_sampling="uniform", conv_channels=0)
    model = randomized(vd.build_network(config))
    x0, labels = torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8)
    part_one, t = vd.ddpm_loss(model, scheduler, x0, labels, config.label_drop,
                               torch.Generator().manual_seed(4))
    part_two, level = vd.denoising_loss(model, scheduler, x0, labels, config,
                                        torch.Generator().manual_seed(4))
    assert torch.equal(part_one, part_two) and torch.equal(t.float() / T, level)
    vanilla = vd.vanilla_config(tiny_config())
    run_loss, _ = vd.training_loss(model, scheduler, x0, labels, vanilla,
                                   torch.Generator().manual_seed(4))
    assert torch.equal(run_loss, part_one)


def test_part_two_ddpm_loop_without_upgrades_is_part_one_loop(scheduler):
    config = vd.vanilla_config(tiny_config())
    model = randomized(vd.build_network(config), std=0.05)
    labels = torch.tensor([2, 9])

    def draw(sampler):
        return vd.generate(model, scheduler, config, labels, shape=(2, 1, 28, 28),
                           guidance_scale=2.0, sampler=sampler, steps=T,
                           generator=torch.Generator().manual_seed(1))

    assert torch.equal(draw("vanilla"), draw("ddpm"))


def random_run(config):
    run, _ = vd.start_run(config, "cpu", seed=0)
    randomized(run.model)
    randomized(run.ema, seed=1)
    run.step = 7
    return run


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    config = tiny_config()
    run = random_run(config)
    path = str(tmp_path / "run" / "ckpt.pt")
    vd.save_checkpoint(path, run, config, seed=3)
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # the temporary file was renamed away
    state, loaded_config = vd.load_checkpoint(path)
    assert loaded_config == config and state["step"] == 7 and state["seed"] == 3
    restored = vd.load_model(path, "cpu").model
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 999]), torch.tensor([0, 10])
    assert torch.equal(restored(x, t, labels), run.ema(x, t, labels))


def test_a_checkpoint_from_before_a_field_existed_keeps_the_behaviour_of_its_time(tmp_path):
    config = tiny_config()
    vd.save_checkpoint(str(tmp_path / "new.pt"), random_run(config), config, seed=0)
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    for name in ("guidance_low", "guidance_high", "guide_at", "t_sampling"):
        del state["config"][name]
    torch.save(state, tmp_path / "old.pt")
    _, old_config = vd.load_checkpoint(str(tmp_path / "old.pt"))
    assert (old_config.guidance_low, old_config.guidance_high, old_config.guide_at) == (0, 1, 0)
    assert old_config.t_sampling == "uniform"


def as_format_1(state):
    """A checkpoint as the file wrote it before format 2: adaLN rows of conditional blocks in
    the order [self-attn, MLP, cross-attn], and ConvDiT's stem and head registered first."""
    D = state["config"]["width"]
    swap = lambda rows: torch.cat([rows[:3 * D], rows[6 * D:], rows[3 * D:6 * D]])  # self-inverse
    names = list(state["model"])
    old_names = [n for n in names if n.startswith(("stem.", "head."))]
    old_names += [n for n in names if not n.startswith(("stem.", "head."))]
    for part in ("model", "ema"):
        weights = {name: state[part][name] for name in old_names}
        state[part] = {name: swap(v) if ".ada_ln.1." in name else v for name, v in weights.items()}
    moments = state["optimizer"]["state"]
    state["optimizer"]["state"] = {
        old_names.index(name): {key: swap(v) if ".ada_ln.1." in name and v.dim() else v
                                for key, v in moments[index].items()}
        for index, name in enumerate(names) if index in moments}
    del state["format"]
    return state


def test_a_format_1_checkpoint_samples_and_resumes_as_it_did(tmp_path):
    config = tiny_config()
    run = random_run(config)
    for parameter in run.model.parameters():  # give the optimizer a state to carry over
        parameter.grad = torch.randn_like(parameter)
    run.optimizer.step()
    vd.save_checkpoint(str(tmp_path / "new.pt"), run, config, seed=0)
    torch.save(as_format_1(torch.load(tmp_path / "new.pt", weights_only=True)),
               tmp_path / "old.pt")
    x, t, labels = torch.randn(2, 1, 28, 28), torch.tensor([1, 999]), torch.tensor([0, 10])
    restored = vd.load_model(str(tmp_path / "old.pt"), "cpu")[0]
    assert torch.equal(restored(x, t, labels), run.ema(x, t, labels))
    resumed, _ = vd.start_run(config, "cpu", 0, vd.load_checkpoint(str(tmp_path / "old.pt"))[0])
    original = run.optimizer.state_dict()["state"]
    for index, state in resumed.optimizer.state_dict()["state"].items():
        assert all(torch.equal(state[key], original[index][key]) for key in state)


def test_non_finite_weights_are_never_saved_and_the_old_checkpoint_stays(tmp_path):
    config = tiny_config()
    run = random_run(config)
    path = tmp_path / "ckpt.pt"
    vd.save_checkpoint(str(path), run, config, seed=0)
    good = path.read_bytes()
    with torch.no_grad():
        next(run.model.parameters())[0] = float("nan")
    with pytest.raises(vd.UserError, match="non-finite"):
        vd.save_checkpoint(str(path), run, config, seed=0)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["ckpt.pt"]


def test_checkpoints_are_flushed_to_disk_before_the_atomic_rename(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    vd.durable_save({"x": torch.ones(2)}, str(tmp_path / "a.pt"))
    assert events[:2] == ["fsync", "replace"]
    assert torch.equal(torch.load(tmp_path / "a.pt")["x"], torch.ones(2))


def test_img2img_strength_near_zero_keeps_the_image_and_one_ignores_it():
    config = tiny_config()
    model = randomized(vd.build_network(config), std=0.05)  # outputs of order 1, as if trained
    scheduler = vd.NoiseScheduler(T)
    three, eight = synthetic_digits(10)[0][[3, 8]].split(1)

    def img2img(init, strength):
        return vd.generate(model, scheduler, config, torch.tensor([8]), shape=(1, 1, 28, 28),
                           guidance_scale=2.0, sampler="ddim", steps=10, init_images=init,
                           strength=strength, generator=torch.Generator().manual_seed(0))

    assert (img2img(three, 0.0001) - three).abs().max() < 0.1
    from_three, from_eight = img2img(three, 1.0), img2img(eight, 1.0)
    # at strength 1 only √ᾱ_{T−1} ≈ 0.006 of the picture is left
    assert (from_three - from_eight).abs().mean() < 0.1 * (three - eight).abs().mean()


def test_faint_share_counts_pixels_between_2_and_25_percent_grey():
    pixels = torch.tensor([0.0, 0.019, 0.02, 0.1, 0.25, 0.26, 0.5, 1.0]).reshape(1, 1, 2, 4)
    assert vd.faint_share(pixels * 2 - 1) == pytest.approx(3 / 8)


def test_frechet_distance_matches_the_gaussian_closed_form():
    torch.manual_seed(0)
    a = torch.randn(20000, 3)
    b = torch.randn(20000, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([1.0, 0.0, 0.0])
    # for diagonal covariances: ‖μ_a − μ_b‖² + Σ (σ_a − σ_b)² = 1 + (0 + 1 + 0.25)
    assert vd.frechet_distance(a, b) == pytest.approx(2.25, abs=0.1)
    assert vd.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


class FirstPixelJudge(torch.nn.Module):
    """A judge that calls an image 1 where its first pixel is bright, else 0."""
    def features(self, x):
        return x.flatten(1)                                                    # [N, C·H·W]

    def head(self, features):
        return torch.stack([-features[:, 0], features[:, 0]], dim=1) * 10     # [N, 2]


def test_the_floor_line_gives_the_judges_accuracy_on_the_real_images(capsys):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (400,), generator=generator)
    pixels = torch.randint(0, 256, (400, 1, 2, 2), generator=generator, dtype=torch.uint8)
    pixels[:, 0, 0, 0] = labels * 255
    pixels[:100, 0, 0, 0] = 255 - pixels[:100, 0, 0, 0]  # a quarter the judge gets wrong
    real = vd.Images(pixels, labels, ())
    vd.real_data_reference(FirstPixelJudge(), real, real, 400, seed=0)
    assert "(the floor): distance 0.00, accuracy 75.00%" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The math behind `show`'s pictures
# ---------------------------------------------------------------------------------------------

def test_the_guess_row_is_predict_x0_of_noise_image(scheduler):
    config = tiny_config(prediction="eps")
    model = randomized(vd.build_network(config), std=0.05)
    x0, labels = synthetic_digits(3)[0], torch.tensor([1, 2, 3])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    noisy, guesses = vd.guesses_at(model, scheduler, config, x0, labels, (0, 400, 999), noise)
    for k, t in enumerate((0, 400, 999)):
        x_t = scheduler.noise_image(x0, t, noise)[0]
        pred_noise = model(x_t, torch.full((3,), float(t)), labels)
        close(noisy[k], x_t, 0)
        close(guesses[k], vd.predict_x0(scheduler, x_t, t, pred_noise).clamp(-1, 1), 1e-6)


def test_nearest_neighbours_agree_with_a_brute_force_search():
    generator = torch.Generator().manual_seed(0)
    queries, references = torch.rand(5, 1, 3, 3, generator=generator), torch.rand(40, 1, 3, 3)
    distances, indices = vd.nearest_neighbours(queries * 2 - 1, references * 2 - 1, k=3)
    for q in range(5):
        brute = sorted((((queries[q] - r) ** 2).sum().sqrt().item(), i)
                       for i, r in enumerate(references))[:3]
        assert indices[q].tolist() == [i for _, i in brute]
        close(distances[q], torch.tensor([d for d, _ in brute]), 1e-5)


def test_the_sampler_rows_share_one_noise_and_end_with_ddpm_over_all_t(scheduler, monkeypatch):
    config = vd.Config(image_size=4, prediction="eps")
    noise, calls, real_generate = torch.randn(2, 1, 4, 4), [], vd.generate
    monkeypatch.setattr(vd, "generate", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    rows = vd.sampler_rows(ExactDenoiser(X_STAR, scheduler, "eps"), scheduler, config, None,
                           1.0, None, noise, vd.samplers_to_show(config, (1, 3)))
    names = ["ddim", "dpm", *vd.SHOW_SIGMA_SAMPLERS]
    assert [(k["sampler"], k["steps"]) for k in calls] == [
        *[(name, count) for name in names for count in (1, 3)], ("ddpm", T)]
    assert all(k["noise"] is noise for k in calls) and list(rows) == [*names, "ddpm"]


def test_the_label_map_is_the_share_of_attention_on_the_label_tokens():
    config = tiny_config()
    model = randomized(vd.build_network(config))
    x, labels, weights = torch.randn(2, 1, 28, 28), torch.tensor([3, 8]), []
    for block in model.blocks:
        block.cross_attn.register_forward_hook(lambda attention, inputs, output: weights.append(
            vd.attention_weights(attention, *inputs)))
    share = vd.label_attention(model, x, 500, labels)                     # [B, 7, 7]
    weights = torch.stack(weights)                                       # [depth, B, h, N, M]
    close(weights.sum(-1), torch.ones_like(weights.sum(-1)), 1e-5)       # a softmax over keys
    timestep_share = weights[..., -1].mean(dim=(0, 2)).reshape(2, 7, 7)  # the last key: time
    close(share, 1 - timestep_share, 1e-5)
    assert share.std() > 1e-3  # patches differ


def test_the_guidance_map_is_zero_where_w_is_1_and_w_minus_1_times_the_gap_inside(scheduler):
    config = tiny_config(prediction="eps", guidance_low=0.0, guidance_high=0.5)
    model = randomized(vd.build_network(config), std=0.05)
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 8])
    outside = vd.guidance_push(model, scheduler, config, x, 900, labels, 3.0)
    assert torch.equal(outside, torch.zeros_like(outside))
    t = torch.full((2,), 300.0)
    gap = model(x, t, labels) - model(x, t, torch.full_like(labels, vd.NULL_LABEL))
    inside = vd.guidance_push(model, scheduler, config, x, 300, labels, 3.0)
    close(inside, (2 * gap).abs()[:, 0], 1e-5, 1e-4)


# ---------------------------------------------------------------------------------------------
# The command line, driven as a user would, on a tiny MNIST written in the real file format
# ---------------------------------------------------------------------------------------------

def write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + bytes(array.flatten().tolist()))


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    """A 200-image MNIST in the idx format torchvision reads: the real loading path runs."""
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
    script = os.path.join(HERE, "vanilla_diffusion.py")
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def train_tiny(tiny_mnist, out_dir, *extra, steps=2):
    vd.main(["train", "--data-dir", tiny_mnist, "--out-dir", str(out_dir), "--max-steps",
             str(steps), "--device", "cpu", *TINY_MODEL, *extra])
    return str(out_dir / "ckpt.pt")


@pytest.fixture(scope="module")
def trained(tiny_mnist, tmp_path_factory):
    """`train --cond` for a few steps through the real command line; the checkpoint's path."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", "--cond", "--data-dir", tiny_mnist, "--max-steps", "3",
                     "--out-dir", str(out), "--device", "cpu", *TINY_MODEL, cwd=out)
    assert result.returncode == 0, result.stderr
    assert "M parameters" in result.stdout and "img/s" in result.stdout
    assert "ETA" in result.stdout and "mean loss" in result.stdout
    assert "per tenth of t" in result.stdout
    assert (out / "ckpt.pt").is_file() and (out / "samples_step000003.png").is_file()
    return str(out / "ckpt.pt")


def png_size(path):
    from PIL import Image
    with Image.open(path) as picture:
        return picture.size


def test_train_then_sample_writes_a_png_grid_of_the_expected_size(trained, tmp_path):
    result = run_cli("sample", "--ckpt", trained, "--label", "4", "--n", "4", "--steps", "5",
                     "--output", "four.png", "--gif", "four.gif", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert png_size(tmp_path / "four.png") == (2 + 2 * 30, 2 + 2 * 30)  # 2×2 of 28 px, pad 2
    assert (tmp_path / "four.gif").stat().st_size > 0


def test_resume_continues_from_the_saved_step(trained, tiny_mnist, tmp_path):
    shutil.copy(trained, tmp_path / "ckpt.pt")
    vd.main(["train", "--resume", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path),
             "--max-steps", "5", "--device", "cpu"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 5


def press_ctrl_c_at_step(monkeypatch, step):
    """A real SIGINT, sent while the update of the given step (1-based) is running."""
    real_update, calls = vd.update_ema, []

    def update_then_interrupt(ema, model, decay):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        real_update(ema, model, decay)

    monkeypatch.setattr(vd, "update_ema", update_then_interrupt)


def assert_same_state(a, b):
    assert a["step"] == b["step"] and torch.equal(a["generator"], b["generator"])
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][name], b[part][name]) for name in a[part])
    for index, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"][index]
        assert all(torch.equal(state[key], other[key]) for key in state)


def test_ctrl_c_then_resume_gives_the_same_weights_bit_for_bit(tiny_mnist, tmp_path,
                                                               monkeypatch, capsys, device):
    # 200 images in batches of 16: 12 steps an epoch; stop mid-epoch at 7, resume to 20
    on = ("--device", device)
    straight = train_tiny(tiny_mnist, tmp_path / "straight", "--cond", *on, steps=20)
    press_ctrl_c_at_step(monkeypatch, 7)
    with pytest.raises(SystemExit) as stopped:
        train_tiny(tiny_mnist, tmp_path / "resumed", "--cond", *on, steps=20)
    assert stopped.value.code == 130 and "continue with --resume" in capsys.readouterr().out
    resumed = str(tmp_path / "resumed" / "ckpt.pt")
    assert torch.load(resumed, weights_only=True)["step"] == 7
    monkeypatch.undo()
    train_tiny(tiny_mnist, tmp_path / "resumed", "--resume", *on, steps=20)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    if device == "cpu":
        assert_same_state(a, b)
    else:  # CUDA's kernels may sum in another order from run to run: equal to float tolerance
        assert a["step"] == b["step"] and torch.equal(a["generator"], b["generator"])
        gap = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
        print(f"resume on {device}: largest weight difference {gap:.2g}")
        assert gap < 1e-5


def test_a_run_resumes_only_on_the_kind_of_device_it_was_trained_on(trained, tmp_path,
                                                                    tiny_mnist, capsys):
    state = torch.load(trained, weights_only=True)
    state["generator"] = torch.zeros(16, dtype=torch.uint8)   # a CUDA generator's state
    torch.save(state, tmp_path / "ckpt.pt")
    expect_one_line_error(["train", "--resume", "--data-dir", tiny_mnist, "--out-dir",
                           str(tmp_path), "--device", "cpu"],
                          "trained on another kind of device", capsys, code=1)


@NO_GPU
def test_on_cuda_a_run_trains_samples_as_on_the_cpu_and_draws_its_pictures(tiny_mnist, tmp_path,
                                                                           monkeypatch):
    ckpt = train_tiny(tiny_mnist, tmp_path / "run", "--cond", "--device", "cuda", steps=6)
    part_1 = str(tmp_path / "vanilla" / "ckpt.pt")
    vd.main(["train", "--cond", "--vanilla", "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "vanilla"), "--max-steps", "6", "--width", "32", "--depth", "1",
             "--batch-size", "16", "--device", "cuda"])
    grids = {}
    monkeypatch.setattr(vd, "save_grid", lambda images, path, **_: grids.update({path: images}))
    for sampler in ("dpm", "ddim", "ddpm", "vanilla"):
        for device in ("cpu", "cuda"):
            vd.main(["sample", "--ckpt", part_1 if sampler == "vanilla" else ckpt, "--label", "3",
                     "--n", "4", "--seed", "5",
                     "--sampler", sampler, "--device", device, "--output",
                     str(tmp_path / f"{sampler}_{device}.png")])
        cpu, cuda = (grids[str(tmp_path / f"{sampler}_{d}.png")] for d in ("cpu", "cuda"))
        gap = (cpu - cuda.cpu()).abs().max().item()
        print(f"{sampler}: CPU and CUDA samples of one seed differ by at most {gap:.2g}")
        assert gap < 0.05   # images in [−1, 1]; another seed differs by about 2
    monkeypatch.undo()
    vd.main(["show", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "pictures"), "--device", "cuda"])
    assert sorted(os.listdir(tmp_path / "pictures")) == SHOW_FILES


def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(
        trained, tiny_mnist, tmp_path, monkeypatch, capsys):
    shutil.copy(trained, tmp_path / "ckpt.pt")
    good = (tmp_path / "ckpt.pt").read_bytes()
    real_loss = vd.training_loss

    def nan_loss(*args):
        per_image, noise_level = real_loss(*args)
        return per_image * float("nan"), noise_level

    monkeypatch.setattr(vd, "training_loss", nan_loss)
    with pytest.raises(SystemExit) as exit_info:
        vd.main(["train", "--resume", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path),
                 "--max-steps", "10", "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and "diverged at step 3" in error and "--lr" in error
    assert len(error.splitlines()) == 1
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_unconditional_run_keeps_an_early_guide_and_evaluates_with_and_without_it(
        tiny_mnist, tmp_path, capsys):
    ckpt = train_tiny(tiny_mnist, tmp_path / "uncond", steps=8)  # guide_at 0.25: after step 2
    state = torch.load(ckpt, weights_only=True)
    assert state["guide"] is not None and state["step"] == 8
    guide_weights, ema_weights = state["guide"], state["ema"]
    assert any(not torch.equal(guide_weights[name], ema_weights[name]) for name in ema_weights)
    vd.main(["evaluate", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--per-label", "2",
             "--samplers", "dpm:3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("dpm")]
    autoguided = f"{vd.Config().autoguidance_scale:g}"
    assert [row[2] for row in rows] == ["1", autoguided]  # the model alone, then autoguided
    assert all(row[6].endswith("%") for row in rows)  # the share of confident samples


def test_evaluate_judges_the_model_alone_and_as_sample_draws_it_by_default(trained, tiny_mnist,
                                                                           capsys):
    vd.main(["evaluate", "--ckpt", trained, "--data-dir", tiny_mnist, "--per-label", "1",
             "--samplers", "ddim:2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("ddim")]
    assert [row[2] for row in rows] == ["1", f"{vd.Config().guidance_scale:g}"]  # CFG's own w


def test_sample_without_label_draws_one_row_per_digit(trained, tmp_path):
    vd.main(["sample", "--ckpt", trained, "--n", "2", "--steps", "2",
             "--output", str(tmp_path / "all.png")])
    assert png_size(tmp_path / "all.png") == (2 + 2 * 30, 2 + 10 * 30)


def test_evaluate_prints_accuracy_and_distance_table(trained, tiny_mnist, capsys):
    vd.main(["evaluate", "--ckpt", trained, "--data-dir", tiny_mnist, "--per-label", "2",
             "--guidance-scales", "0,3", "--samplers", "ddim:3"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("ddim")]
    floor = float(out.split("(the floor): distance ")[1].split(",")[0])
    assert [row[2] for row in rows] == ["0", "3"]
    assert all(row[3].endswith("%") and float(row[-4]) >= 0 for row in rows)
    assert all(abs(float(row[-4]) - floor - float(row[-3])) <= 0.011 for row in rows)  # excess
    assert all(0 <= float(row[-2].rstrip("%")) <= 100 for row in rows)  # the faint share



def test_evaluate_takes_the_sigma_samplers_and_counts_heuns_evaluations(trained, tiny_mnist,
                                                                         capsys):
    vd.main(["evaluate", "--ckpt", trained, "--data-dir", tiny_mnist, "--per-label", "1",
             "--guidance-scales", "2", "--samplers", "heun:4,dpm++2m-karras:3",
             "--sigma-min", "0.05"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("heun", "dpm++2m-karras"))]
    assert [row[:2] for row in rows] == [["heun", "3"], ["dpm++2m-karras", "3"]]


def test_a_cosine_x0_run_samples_with_the_new_samplers_and_the_posterior_variance(
        tiny_mnist, tmp_path, capsys):
    ckpt = train_tiny(tiny_mnist, tmp_path / "run", "--cond", "--schedule", "cosine",
                      "--prediction", "x0")
    config = vd.load_checkpoint(ckpt)[1]
    assert (config.schedule, config.prediction) == ("cosine", "x0")
    sample = ["sample", "--ckpt", ckpt, "--label", "2", "--n", "2"]
    for sampler, extra in (("heun", []), ("euler-a-karras", ["--eta", "0.5"]),
                           ("dpm++2m-sde", ["--eta", "0.5"])):
        vd.main([*sample, "--sampler", sampler, "--steps", "4", *extra,
                 "--output", str(tmp_path / f"{sampler}.png")])
    vd.main([*sample, "--sampler", "ddpm", "--variance", "posterior",
             "--output", str(tmp_path / "ddpm.png")])
    out = capsys.readouterr().out
    assert "heun with 3 network evaluations" in out and "ddpm with 1000" in out
    assert png_size(tmp_path / "ddpm.png") == png_size(tmp_path / "heun.png")

def expect_one_line_error(args, message, capsys, code=None):
    with pytest.raises(SystemExit) as exit_info:
        vd.main(args)
    assert exit_info.value.code != 0 and (code is None or exit_info.value.code == code)
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error


@pytest.mark.parametrize("args, message", [
    (["--label", "12"], "is not one of the model's classes: 0, 1"),
    (["--n", "-3"], "positive whole number"),
    (["--steps", "0"], "positive whole number"),
    (["--strength", "1.5"], "(0, 1]"),
    (["--seed", "-1"], "whole number ≥ 0"),
    (["--ckpt", "/nonexistent/ckpt.pt"], "no checkpoint at /nonexistent/ckpt.pt"),
    (["--steps", "5000"], "--steps must be between 1 and T = 1000"),
    (["--sde-noise", "0.5"], "--sde-noise needs a checkpoint trained with --objective flow"),
    (["--sigma-min", "0.1", "--sampler", "dpm"],
     "--sigma-min needs a *-karras sampler (got dpm)"),
    (["--variance", "posterior"], "--variance needs --sampler ddpm (got dpm++2m-karras)"),
    (["--sampler", "ddpm", "--steps", "10"], "all T = 1000 steps"),
    (["--init-image", "/nonexistent.png", "--label", "3"], "no init image"),
    (["--guidance-scale", "nan"], "finite number"),
    (["--guidance-scale", "2,inf"], "finite number"),
    (["--output", "/proc/nope/samples.png"], "cannot write into /proc/nope"),
    (["--output", "samples"], "must end in one of"),
    (["--gif", "/proc/nope/denoise.gif"], "cannot write into /proc/nope"),
    (["--gif", "denoise.png"], "must end in one of .gif"),
    (["--classifier-scale", "nan"], "--classifier-scale: must be a number in [0, 100]"),
    (["--classifier-scale", "inf"], "--classifier-scale: must be a number in [0, 100]"),
    (["--eta", "0.5"], "--eta needs a sampler that adds fresh noise"),
    (["--eta", "2", "--sampler", "ddim"], "--eta: must be a number in [0, 1]"),
    (["--sampler", "vanilla"], "needs a network that predicts ε"),
])
def test_bad_sample_input_gives_one_clear_line_and_writes_nothing(trained, args, message,
                                                                   capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--ckpt" not in args:
        args = [*args, "--ckpt", trained]
    expect_one_line_error(["sample", *args], message, capsys)
    assert os.listdir(tmp_path) == []


def test_every_train_flag_reaches_the_config():
    """Each training flag, set away from its default, arrives in Config under its own name."""
    flags = {"epochs": "3", "batch_size": "8", "lr": "0.002", "label_drop": "0.2",
             "warmup_steps": "7", "ema_decay": "0.99", "min_snr_gamma": "5",
             "t_sampling": "uniform", "logsnr_mean": "-1.5", "logsnr_std": "1.5",
             "patch_size": "7", "width": "32", "depth": "2", "heads": "4",
             "conv_channels": "8", "prediction": "eps", "adam_beta2": "0.95",
             "schedule": "cosine"}
    argv = ["train", "--cond"]
    for name, value in flags.items():
        argv += ["--" + name.replace("_", "-"), value]
    config = vd.config_from_flags(vd.build_parser().parse_args(argv))
    defaults = vd.Config()
    assert config.cond
    for name, value in flags.items():
        expected = type(getattr(defaults, name))(value)
        assert getattr(config, name) == expected != getattr(defaults, name), name


def test_the_unconditional_model_has_its_own_defaults_and_flags_override_them():
    parse = lambda *argv: vd.config_from_flags(vd.build_parser().parse_args(["train", *argv]))
    unconditional, conditional = parse(), parse("--cond")
    assert {name: getattr(unconditional, name) for name in vd.UNCONDITIONAL_DEFAULTS} == \
        vd.UNCONDITIONAL_DEFAULTS
    assert (conditional.patch_size, conditional.heads, conditional.epochs) == (4, 2, 5)
    assert conditional.adam_beta2 == 0.999
    assert (parse("--patch-size", "4", "--epochs", "2").patch_size, parse("--epochs", "2").epochs,
            parse("--heads", "2").heads) == (4, 2, 2)


@pytest.mark.parametrize("args, message", [
    (["--patch-size", "5"], "--patch-size 5 does not divide"),
    (["--width", "30"], "divisible by 4"),
    (["--width", "36", "--heads", "8"], "divisible by --heads 8"),
    (["--lr", "-1"], "--lr: must be a number in (0, 1]"),
    (["--lr", "nan"], "--lr: must be a number in (0, 1]"),
    (["--lr", "1e4"], "--lr: must be a number in (0, 1]"),
    (["--label-drop", "2"], "[0, 1)"),
    (["--ema-decay", "1"], "--ema-decay: must be a number in [0, 1)"),
    (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
    (["--warmup-steps", "-5"], "whole number ≥ 0"),
    (["--conv-channels", "-1"], "whole number ≥ 0"),
    (["--batch-size", "100000"], "larger than the 200 training images"),
    (["--out-dir", "/proc/nope"], "--out-dir: cannot write into /proc/nope"),
])
def test_bad_train_input_gives_one_clear_line_before_any_work(tiny_mnist, args, message,
                                                               capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expect_one_line_error(["train", "--data-dir", tiny_mnist, *args], message, capsys)
    assert os.listdir(tmp_path) == []  # no runs/ folder, no checkpoint


def test_a_finished_run_is_not_overwritten_without_overwrite(trained, tiny_mnist, capsys):
    before = open(trained, "rb").read()
    out_dir = os.path.dirname(trained)
    expect_one_line_error(["train", "--data-dir", tiny_mnist, "--out-dir", out_dir],
                          "already holds a run", capsys, code=1)
    expect_one_line_error(["train", "--data-dir", tiny_mnist, "--out-dir", out_dir, "--resume",
                           "--overwrite"], "give one of the two", capsys, code=1)
    assert open(trained, "rb").read() == before


@pytest.mark.parametrize("args, message", [
    (["--guidance-scales", "2,x"], "finite number"),
    (["--guidance-scales", "nan"], "finite number"),
    (["--samplers", "ddim:abc"], "sampler:steps"),
    (["--samplers", "ddim:2000"], "--steps must be between 1 and T = 1000"),
    (["--samplers", "plms:10"], "unknown sampler"),
])
def test_bad_evaluate_input_gives_one_clear_line(trained, args, message, capsys):
    expect_one_line_error(["evaluate", "--ckpt", trained, *args], message, capsys)


def test_corrupted_or_mismatched_checkpoints_and_misused_flags_are_clear_errors(
        trained, tiny_mnist, tmp_path, capsys):
    corrupted = tmp_path / "ckpt.pt"
    corrupted.write_bytes(b"not a checkpoint")
    unconditional = train_tiny(tiny_mnist, tmp_path / "uncond", steps=1)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    mismatched = tmp_path / "mismatched.pt"
    state = torch.load(trained, weights_only=True)
    state["config"]["conv_channels"] = 0  # weights of one architecture, config of another
    torch.save(state, mismatched)
    capsys.readouterr()
    cases = [([str(corrupted)], "is not a readable VanillaDiffusion checkpoint"),
             ([str(mismatched)], "do not fit the model"),
             ([unconditional, "--label", "3"], "is an unconditional model"),
             ([trained, "--label", "3", "--init-image", str(not_an_image)], "could not read"),
             ([trained, "--negative-label", "3"], "--negative-label needs"),
             ([trained, "--guidance-scale", "1,2"], "give a --label too")]
    for args, message in cases:
        expect_one_line_error(["sample", "--ckpt", *args], message, capsys, code=1)
    assert corrupted.read_bytes() == b"not a checkpoint"  # a failed command destroys nothing


def test_missing_mnist_without_network_says_where_it_looked(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import MNIST

    def no_network(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(MNIST, "download", no_network)
    empty = tmp_path / "empty"
    expect_one_line_error(["train", "--data-dir", str(empty), "--max-steps", "1"],
                          str(empty / "MNIST" / "raw"), capsys, code=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_clear_error(trained, capsys):
    expect_one_line_error(["sample", "--ckpt", trained, "--device", "cuda"], "sees no CUDA GPU",
                          capsys)


def test_the_files_read_without_sideways_scrolling_in_functions_of_a_screen():
    for name in ("vanilla_diffusion.py", "test_vanilla_diffusion.py"):
        lines = open(os.path.join(HERE, name), encoding="utf-8").read().splitlines()
        assert [i + 1 for i, line in enumerate(lines) if len(line) > 100] == [], name
    for name in ("vanilla_diffusion.py", "test_vanilla_diffusion.py"):  # tests too: 35 lines
        tree = ast.parse(open(os.path.join(HERE, name), encoding="utf-8").read())
        sizes = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef)}
        assert {name: size for name, size in sizes.items() if size > 35} == {}


def test_importing_the_module_prints_nothing():
    result = subprocess.run([sys.executable, "-c", "import vanilla_diffusion"], cwd=HERE,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""


def test_vanilla_trains_and_samples_exactly_part_one_from_the_command_line(
        tiny_mnist, tmp_path, monkeypatch, capsys):
    vd.main(["train", "--cond", "--vanilla", "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "vanilla"), "--max-steps", "2", "--device", "cpu", "--width", "32",
             "--depth", "1", "--batch-size", "16"])
    ckpt = str(tmp_path / "vanilla" / "ckpt.pt")
    state, config = vd.load_checkpoint(ckpt)
    assert config.vanilla and config.prediction == "eps" and config.t_sampling == "uniform"
    assert config.sampler == "vanilla" and not any(name.startswith("stem") for name in state["ema"])
    assert (tmp_path / "vanilla" / "samples_step000002.png").is_file()
    calls, part_one = [], vd.sample_ddpm_cfg
    monkeypatch.setattr(vd, "sample_ddpm_cfg", lambda *a: calls.append(1) or part_one(*a))
    vd.main(["sample", "--ckpt", ckpt, "--label", "3", "--n", "2",
             "--output", str(tmp_path / "three.png")])
    assert calls == [1] and png_size(tmp_path / "three.png") == (62, 32)
    expect_one_line_error(["train", "--vanilla", "--prediction", "v", "--data-dir", tiny_mnist],
                          "--vanilla trains exactly Part I; --prediction", capsys, code=1)
    expect_one_line_error(["sample", "--ckpt", ckpt, "--label", "3", "--gif", "a.gif"],
                          "--gif is a Part II feature", capsys, code=1)


def test_classifier_guidance_steers_an_unconditional_model_from_the_command_line(
        tiny_mnist, tmp_path, capsys):
    ckpt = train_tiny(tiny_mnist, tmp_path / "uncond", steps=2)
    sample = ["sample", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--steps", "3",
              "--classifier-scale", "2"]
    capsys.readouterr()
    vd.main([*sample, "--label", "4", "--n", "4", "--output", str(tmp_path / "fours.png")])
    out = capsys.readouterr().out
    assert "training the noisy classifier" in out and "accuracy per tenth of t" in out
    assert (tmp_path / "uncond" / "noisy_classifier.pt").is_file()
    vd.main([*sample, "--n", "2", "--sampler", "ddim", "--eta", "1",
             "--output", str(tmp_path / "all.png")])
    assert "training" not in capsys.readouterr().out  # the cached classifier is reused
    assert png_size(tmp_path / "fours.png") == (62, 62)
    assert png_size(tmp_path / "all.png") == (2 + 2 * 30, 2 + 10 * 30)  # a row per digit
    vd.main(["evaluate", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--per-label", "2",
             "--samplers", "ddim:3", "--guidance-scales", "1", "--classifier-scales", "0,2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith("ddim")]
    assert [row[3] for row in rows] == ["0", "2"] and all(row[4].endswith("%") for row in rows)
    flow = train_tiny(tiny_mnist, tmp_path / "flow", "--objective", "flow", steps=1)
    expect_one_line_error(["sample", "--ckpt", flow, "--classifier-scale", "1"],
                          "--classifier-scale needs a DDPM checkpoint", capsys, code=1)
    expect_one_line_error(["sample", "--ckpt", ckpt, "--label", "1"],
                          "steer it with --classifier-scale", capsys, code=1)


SHOW_FILES = ["1_what_it_sees.png", "2_coarse_to_fine.gif", "2_coarse_to_fine.png",
              "3_where_the_label_acts.png", "4_few_steps.png", "5_is_it_copying.png"]


@pytest.fixture
def quick_show(monkeypatch):
    """show's few-steps picture at 1 and 2 evaluations only (3 of the 88 a sampler): the same
    code, less work."""
    monkeypatch.setattr(vd, "SHOW_EVALUATIONS", (1, 2))


def test_show_draws_every_picture_that_applies_to_each_kind_of_checkpoint(
        trained, tiny_mnist, tmp_path, capsys, quick_show):
    uncond = train_tiny(tiny_mnist, tmp_path / "uncond", steps=8)   # with a guide
    flow = train_tiny(tiny_mnist, tmp_path / "flow", "--cond", "--objective", "flow")
    for name, ckpt in (("cond", trained), ("uncond", uncond), ("flow", flow)):
        vd.main(["show", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--out-dir",
                 str(tmp_path / f"{name}_pictures"), "--device", "cpu"])
        assert sorted(os.listdir(tmp_path / f"{name}_pictures")) == SHOW_FILES, name
    assert "wrote 6 pictures" in capsys.readouterr().out
    expect_one_line_error(["show", "--ckpt", uncond, "--label", "3", "--out-dir",
                           str(tmp_path / "no")], "its pictures take no --label", capsys, code=1)
    expect_one_line_error(["show", "--ckpt", str(tmp_path / "none.pt"), "--out-dir",
                           str(tmp_path / "no")], "no checkpoint at", capsys, code=1)
    expect_one_line_error(["show", "--ckpt", trained, "--out-dir", "/proc/nope"],
                          "--out-dir: cannot write into /proc/nope", capsys, code=1)
    assert not (tmp_path / "no").exists()


def test_flow_checkpoint_samples_with_euler_does_img2img_and_refuses_ddpm(tiny_mnist, tmp_path,
                                                                          capsys):
    ckpt = train_tiny(tiny_mnist, tmp_path / "flow", "--cond", "--objective", "flow")
    assert vd.load_checkpoint(ckpt)[1].objective == "flow"
    sample = ["sample", "--ckpt", ckpt, "--label", "8", "--n", "4", "--steps", "3"]
    vd.main([*sample, "--output", str(tmp_path / "a.png")])
    vd.main([*sample, "--init-image", os.path.join(HERE, "assets", "three.png"),
             "--strength", "0.5", "--output", str(tmp_path / "b.png")])
    assert "euler with 3 network evaluations" in capsys.readouterr().out
    assert png_size(tmp_path / "a.png") == png_size(tmp_path / "b.png") == (62, 62)
    expect_one_line_error(["sample", "--ckpt", ckpt, "--sampler", "ddpm"],
                          "trained with --objective flow", capsys)


# ---------------------------------------------------------------------------------------------
# The shipped models (assets/models/): digits right after `git clone`
# ---------------------------------------------------------------------------------------------

SHIPPED_PICTURES = {"conditional": ("shipped_fours.png", ["--label", "4"]),
                    "unconditional": ("shipped_unconditional.png", [])}
# how each was made (README, "Run it"): the defaults trained longer, then shipped with the
# guidance scale judged best for it (docs/scripts/ship_checkpoint.py's third argument)
SHIPPED_RECIPES = {"conditional": (["train", "--cond", "--epochs", "20", "--logsnr-mean", "-2"],
                                   {"guidance_scale": 1.3}),
                   "unconditional": (["train"], {})}


def test_the_shipped_models_load_weights_only_match_the_defaults_and_stay_under_4_mb():
    """A change of the defaults or of the checkpoint format fails here until the shipped files
    are retrained or upgraded in the same change."""
    for kind, path in vd.SHIPPED_MODELS.items():
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["shipped"] and "optimizer" not in state and "generator" not in state
        assert state["format"] == vd.CHECKPOINT_FORMAT
        assert set(state["config"]) == set(vars(vd.Config()))  # every field, as saved today
        argv, sampling = SHIPPED_RECIPES[kind]
        assert vd.load_checkpoint(path)[1] == replace(vd.config_from_flags(
            vd.build_parser().parse_args(argv)), **sampling)
        assert (state["guide"] is not None) == (kind == "unconditional")
    assert sum(os.path.getsize(path) for path in vd.SHIPPED_MODELS.values()) <= 4 * 2**20


def decoded(path):
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    return pil_to_tensor(Image.open(path).convert("L")).int()


@pytest.mark.parametrize("kind", SHIPPED_PICTURES)
def test_the_shipped_models_draw_the_readmes_pictures_on_the_cpu(kind, tmp_path):
    picture, argv = SHIPPED_PICTURES[kind]
    vd.main(["sample", "--ckpt", vd.SHIPPED_MODELS[kind], "--device", "cpu", *argv,
             "--output", str(tmp_path / picture)])
    gap = (decoded(tmp_path / picture) - decoded(os.path.join(HERE, "assets", picture))).abs()
    assert gap.float().mean() < 0.5 and gap.max() <= 16  # of 255: float rounding, not images


def test_without_a_checkpoint_sample_uses_the_shipped_model_and_never_resumes_it(
        tmp_path, monkeypatch, capsys, tiny_mnist):
    monkeypatch.chdir(tmp_path)
    vd.main(["sample", "--label", "4", "--n", "4"])
    out = capsys.readouterr().out
    assert "no runs/ckpt.pt yet: using the shipped model" in out and "train --cond" in out
    assert png_size(tmp_path / "samples.png") == (62, 62)
    os.makedirs("runs")
    shutil.copy(vd.SHIPPED_MODELS["conditional"], "runs/ckpt.pt")
    expect_one_line_error(["train", "--data-dir", tiny_mnist, "--resume"],
                          "is a shipped model (sampling weights only)", capsys, code=1)


# ---------------------------------------------------------------------------------------------
# Your own pictures: a folder (classes from its subfolders), colour, any size; torchrun
# ---------------------------------------------------------------------------------------------

def save_picture(path, array, mode):
    """uint8 [H, W] (grey) or [H, W, 3] (RGB) as a picture file; its folders are made."""
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array.numpy(), mode).save(path)


def test_a_folder_gives_sorted_classes_colour_and_pictures_cut_to_the_size(tmp_path):
    # a 60×20 picture whose middle 40 columns are one colour and whose outer 10 another: the
    # shorter side goes to 16, then the centre crop keeps the middle 20 of the 60 columns
    wide = torch.zeros(20, 60, 3, dtype=torch.uint8)
    wide[:, :10], wide[:, 10:50], wide[:, 50:] = 255, torch.tensor([200, 40, 40]), 255
    save_picture(str(tmp_path / "dog" / "a.png"), wide, "RGB")
    save_picture(str(tmp_path / "dog" / "deeper" / "b.png"), torch.full((16, 16), 9,
                                                                        dtype=torch.uint8), "L")
    save_picture(str(tmp_path / "cat" / "c.jpg"), torch.full((24, 24), 77, dtype=torch.uint8),
                 "L")
    (tmp_path / "cat" / "notes.txt").write_text("not a picture")  # ignored
    found = vd.find_data(str(tmp_path), image_size=16)
    assert found.class_names == ("cat", "dog") and found.count == 3 and found.channels == 3
    images = found.decode()
    assert images.pixels.shape == (3, 3, 16, 16) and images.pixels.dtype == torch.uint8
    assert images.labels.tolist() == [0, 1, 1]  # cat, then dog's pictures, deeper ones too
    middle = images.pixels[1].permute(1, 2, 0).reshape(-1, 3).float()
    assert (middle - torch.tensor([200.0, 40, 40])).abs().max() <= 2
    assert (images.pixels[0] - 77).abs().max() <= 1 and (images.pixels[2] == 9).all()
    assert vd.find_data(str(tmp_path)).size == 16  # default: the smallest shorter side


def test_a_flat_folder_is_unconditional_and_grey_when_every_picture_is(tmp_path):
    for k in range(3):
        save_picture(str(tmp_path / f"{k}.png"), torch.full((10, 12), 50 * k,
                                                            dtype=torch.uint8), "L")
    found = vd.find_data(str(tmp_path), image_size=8)
    assert found.class_names == () and found.num_classes == 1 and found.channels == 1
    assert found.decode().pixels.shape == (3, 1, 8, 8)


def test_mnist_as_a_folder_of_pngs_decodes_to_the_mnist_tensor(tiny_mnist, tmp_path):
    mnist = vd.find_data("mnist", tiny_mnist).decode()
    for i, (pixels, label) in enumerate(zip(mnist.pixels, mnist.labels.tolist())):
        save_picture(str(tmp_path / str(label) / f"{i:05d}.png"), pixels[0], "L")
    folder = vd.find_data(str(tmp_path)).decode()
    order = torch.sort(mnist.labels, stable=True).indices  # ImageFolder's order: class-major
    assert torch.equal(folder.pixels, mnist.pixels[order])
    assert torch.equal(folder.labels, mnist.labels[order])


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """140 pictures of 16×16 in two class folders: a red bar at the top, a blue one below."""
    root = tmp_path_factory.mktemp("colours")
    for k in range(140):
        picture, row = torch.zeros(16, 16, 3, dtype=torch.uint8), k % 4
        if k % 2 == 0:
            picture[2 + row:6 + row, 2:14, 0] = 255     # red, high
        else:
            picture[8 + row:12 + row, 2:14, 2] = 255    # blue, low
        save_picture(str(root / ("red" if k % 2 == 0 else "blue") / f"{k:03d}.png"), picture,
                     "RGB")
    return str(root)


def test_a_colour_folder_trains_samples_by_name_evaluates_shows_and_resumes(
        colour_folder, tmp_path, capsys, quick_show):
    train = ["train", "--cond", "--data", colour_folder, "--patch-size", "4", *TINY_MODEL,
             "--device", "cpu"]
    vd.main([*train, "--max-steps", "2", "--out-dir", str(tmp_path / "cut")])
    state, config = vd.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert (config.channels, config.image_size, config.num_classes) == (3, 16, 2)
    assert config.class_names == ("blue", "red") and config.data == colour_folder
    vd.main(["train", "--resume", "--max-steps", "4", "--out-dir", str(tmp_path / "cut")])
    vd.main([*train, "--max-steps", "4", "--out-dir", str(tmp_path / "whole")])
    assert_same_state(torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True),
                      torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True))
    ckpt = str(tmp_path / "whole" / "ckpt.pt")
    for label in ("red", "1"):
        out = tmp_path / f"{label}.png"
        vd.main(["sample", "--ckpt", ckpt, "--label", label, "--n", "4", "--output", str(out)])
        from PIL import Image
        with Image.open(out) as picture:
            assert picture.mode == "RGB" and picture.size == (2 + 2 * 18, 2 + 2 * 18)
    capsys.readouterr()
    vd.main(["evaluate", "--ckpt", ckpt, "--per-label", "2", "--guidance-scales", "1"])
    out = capsys.readouterr().out
    assert "on the 140 test images" in out and "worst class" in out
    vd.main(["show", "--ckpt", ckpt, "--label", "blue", "--out-dir", str(tmp_path / "pictures")])
    assert sorted(os.listdir(tmp_path / "pictures")) == SHOW_FILES
    expect_one_line_error(["sample", "--ckpt", ckpt, "--label", "green"],
                          "'green' is not one of the model's classes: blue, red", capsys, code=1)


def bad_folders(root):
    """Folders no run can train on: empty, one class, no classes, a corrupt and a cut file."""
    (root / "empty").mkdir()
    picture = torch.zeros(16, 16, dtype=torch.uint8)
    save_picture(str(root / "one" / "cats" / "a.png"), picture, "L")
    save_picture(str(root / "flat" / "a.png"), picture, "L")
    save_picture(str(root / "broken" / "a" / "fine.png"), picture, "L")
    save_picture(str(root / "broken" / "b" / "fine.png"), picture, "L")
    (root / "broken" / "b" / "corrupt.png").write_bytes(b"not a png at all")
    save_picture(str(root / "cut" / "a" / "fine.png"), picture, "L")
    noise = torch.randint(0, 256, (64, 64), generator=torch.Generator().manual_seed(0))
    save_picture(str(root / "cut" / "b" / "whole.png"), noise.to(torch.uint8), "L")
    whole = (root / "cut" / "b" / "whole.png").read_bytes()
    (root / "cut" / "b" / "truncated.png").write_bytes(whole[:len(whole) * 3 // 4])


def test_bad_data_gets_one_line_before_any_work(colour_folder, tmp_path, capsys, monkeypatch):
    from torchvision.datasets import CIFAR10
    bad_folders(tmp_path)

    def no_network(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(CIFAR10, "download", no_network)
    out = tmp_path / "out"
    cases = [(["--data", str(tmp_path / "empty")], "no pictures found"),
             (["--cond", "--data", str(tmp_path / "one")], "--cond needs two classes at least"),
             (["--cond", "--data", str(tmp_path / "flat")], "has no subfolders"),
             (["--data", str(tmp_path / "broken")], "corrupt.png as a picture"),
             (["--data", str(tmp_path / "cut"), "--batch-size", "2", "--image-size", "14"],
              "cannot decode"),
             (["--data", colour_folder, "--image-size", "30", "--patch-size", "4"],
              "use a --patch-size of 1, 2, 3, 5, 6, 10, 15, 30, or an --image-size divisible"),
             (["--data", "cifar10", "--data-dir", str(tmp_path / "nothing")],
              str(tmp_path / "nothing" / "cifar-10-batches-py")),
             (["--data", str(tmp_path / "missing")], "not a folder, nor one of mnist")]
    for args, message in cases:
        expect_one_line_error(["train", "--out-dir", str(out), *args], message, capsys, code=1)
    assert not out.exists()


def test_a_batch_that_torchruns_processes_cannot_share_gets_one_line(tiny_mnist, tmp_path,
                                                                     capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would: before any process group
    expect_one_line_error(["train", "--data-dir", tiny_mnist, "--out-dir", str(tmp_path / "o")],
                          "--batch-size 32 is the batch of all 3 processes together", capsys,
                          code=1)
    assert not (tmp_path / "o").exists()


def torchrun(*args, processes, cwd):
    script = os.path.join(HERE, "vanilla_diffusion.py")
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", script, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=environment)


def test_two_gloo_processes_train_as_one_process_does_and_a_cut_run_resumes(tiny_mnist,
                                                                             tmp_path):
    train = ["train", "--cond", "--data-dir", tiny_mnist, *TINY_MODEL, "--device", "cpu"]
    result = torchrun(*train, "--max-steps", "3", "--out-dir", "two", processes=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("M parameters") == 1 and "2 processes on cpu" in result.stdout
    assert sorted(os.listdir(tmp_path / "two")) == ["ckpt.pt", "samples_step000003.png"]
    vd.main([*train, "--max-steps", "3", "--out-dir", str(tmp_path / "one")])  # one process
    two, one = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
                for name in ("two", "one"))
    assert torch.equal(two["generator"], one["generator"])  # the same draws, in the same order
    for part in ("model", "ema"):  # the same steps, up to float rounding of half batches
        for name, value in one[part].items():
            close(two[part][name], value, atol=1e-4)
    vd.main(["train", "--resume", "--data-dir", tiny_mnist, "--max-steps", "5", "--out-dir",
             str(tmp_path / "two"), "--device", "cpu"])  # a run of two goes on in one
    assert torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["step"] == 5


# ---------------------------------------------------------------------------------------------
# II.15's UNet
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, size", [(1, 28), (3, 16), (1, 8)])
def test_the_unet_keeps_the_shape_starts_at_zero_and_reads_the_label(channels, size):
    config = vd.Config(arch="unet", cond=True, unet_channels=8, width=16, heads=2,
                       label_tokens=2, channels=channels, image_size=size, num_classes=3)
    model = vd.build_network(config)
    x, t = torch.randn(4, channels, size, size), torch.tensor([0.0, 10.0, 500.0, 999.0])
    labels = torch.tensor([0, 1, 2, vd.NULL_LABEL])
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))  # the last conv starts at 0
    randomized(model, std=0.2)
    outputs = [model(x[:1].expand(4, -1, -1, -1), t[:1].expand(4), torch.tensor([k] * 4))
               for k in (0, 1, 2, vd.NULL_LABEL)]
    assert outputs[0].shape == (4, channels, size, size)
    for a in range(4):
        for b in range(a + 1, 4):  # every label, and ∅, gives another output
            assert (outputs[a] - outputs[b]).abs().max() > 1e-4


def test_the_unets_cross_attention_sums_to_one_over_the_label_and_time_tokens():
    config = vd.Config(arch="unet", cond=True, unet_channels=8, width=16, heads=2,
                       label_tokens=2)
    model, weights = randomized(vd.build_network(config), std=0.2), []
    layers = [m.cross_attn for m in model.modules() if getattr(m, "cross_attn", None)]
    for layer in layers:
        layer.register_forward_hook(lambda attention, inputs, output: weights.append(
            vd.attention_weights(attention, *inputs)))
    share = vd.label_attention(model, torch.randn(2, 1, 28, 28), 500, torch.tensor([3, 8]))
    assert len(layers) == 5 and share.shape == (2, 14, 14)
    for w in weights:                                     # [B, h, N, label_tokens + 1]
        assert w.shape[-1] == 3
        close(w.sum(-1), torch.ones_like(w.sum(-1)), 1e-5)


def test_a_unet_trains_a_few_steps_the_loss_falls_and_it_lifts_alone():
    config = vd.Config(arch="unet", cond=True, unet_channels=8, width=16, heads=2,
                       label_tokens=2, lr=3e-3, warmup_steps=5)
    run, scheduler = vd.start_run(config, "cpu", seed=0)
    images, labels = synthetic_digits(64)

    def loss(generator):
        return vd.training_loss(run.model, scheduler, images, labels, config, generator)[0].mean()

    before = loss(torch.Generator().manual_seed(9)).item()
    for step in range(30):
        vd.set_learning_rate(run.optimizer, vd.learning_rate(step, 30, config))
        run.optimizer.zero_grad()
        loss(run.generator).backward()
        run.optimizer.step()
    assert loss(torch.Generator().manual_seed(9)).item() < 0.7 * before
    namespace = lifted("II.15")  # with only what its banner names
    small = namespace["Config"](arch="unet", cond=True, unet_channels=8, width=16, heads=2)
    out = namespace["UNet"](small)(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0]),
                                   torch.tensor([0, namespace["NULL_LABEL"]]))
    assert out.shape == (2, 1, 28, 28)


def test_the_unet_trains_samples_evaluates_and_shows_from_the_command_line(tiny_mnist, tmp_path,
                                                                           capsys, quick_show):
    ckpt = train_tiny(tiny_mnist, tmp_path / "unet", "--cond", "--arch", "unet",
                      "--unet-channels", "8", "--image-size", "16")  # 16: levels 16, 8, 4
    assert vd.load_checkpoint(ckpt)[1].arch == "unet"
    vd.main(["sample", "--ckpt", ckpt, "--label", "3", "--n", "2", "--steps", "3",
             "--output", str(tmp_path / "three.png")])
    vd.main(["evaluate", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--per-label", "2",
             "--samplers", "ddim:3", "--guidance-scales", "1.5"])
    vd.main(["show", "--ckpt", ckpt, "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "pictures")])
    assert sorted(os.listdir(tmp_path / "pictures")) == SHOW_FILES
    for args, message in [(["--arch", "unet", "--image-size", "30", "--patch-size", "2"],
                           "the 30-pixel image does not (use an image size of 28 or 32"),
                          (["--arch", "unet", "--unet-channels", "12"], "divisible by 8"),
                          (["--arch", "transformer"], "invalid choice: 'transformer'"),
                          (["--vanilla", "--arch", "unet"], "--vanilla trains exactly Part I")]:
        expect_one_line_error(["train", "--data-dir", tiny_mnist, "--out-dir",
                               str(tmp_path / "bad"), *args], message, capsys)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# II.16's latent diffusion
# ---------------------------------------------------------------------------------------------

def test_the_vaes_kl_is_the_closed_form_and_its_draws_have_the_encoders_moments():
    from torch.distributions import Normal, kl_divergence
    mean, log_var = torch.randn(3, 4, 7, 7), torch.randn(3, 4, 7, 7)
    exact = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0))
    close(vd.kl_to_standard_normal(mean, log_var), exact.flatten(1).sum(1), 1e-4, 1e-5)
    m, lv = torch.tensor([0.7, -1.2]), torch.tensor([0.4, -2.0])
    n = 200_000
    z = vd.reparameterise(m.expand(n, 2), lv.expand(n, 2), torch.Generator().manual_seed(0))
    sd = (0.5 * lv).exp()
    assert ((z.mean(0) - m).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((z.var(0) - sd ** 2).abs() < 5 * sd ** 2 * math.sqrt(2 / n)).all()
    vae = vd.VAE(3, 4, 4)
    x = torch.randn(2, 3, 16, 16)
    assert vae.encode(x)[0].shape == (2, 4, 4, 4) and vae.decode(vae.encode(x)[0]).shape == x.shape


def test_the_vae_stage_scales_the_latents_to_unit_variance(tiny_mnist, tmp_path):
    config = vd.Config(latent=True)
    images = vd.find_data("mnist", tiny_mnist).decode().pixels
    state, scale = vd.trained_vae(config, images, str(tmp_path), epochs=1)
    vae = vd.VAE(1, 2, 2)
    vae.load_state_dict(state)
    with torch.no_grad():
        latents = scale * vae.encode(vd.as_x0(images))[0]
    close(latents.std(), torch.tensor(1.0), 1e-4)
    assert (tmp_path / "vae.pt").is_file()


def test_a_latent_models_default_patch_is_the_largest_that_divides_its_latent(tiny_mnist):
    """The pixel default over f, or the largest divisor of the latent below it (the
    unconditional 7 over f = 2 is 3, which 14 does not take); a given --patch-size is kept."""
    found = vd.find_data("mnist", tiny_mnist)
    for flags, patch in [(["--cond"], 2), ([], 2), (["--latent-factor", "4"], 1),
                         (["--patch-size", "7"], 7), (["--cond", "--latent-factor", "4"], 1)]:
        args = vd.build_parser().parse_args(["train", "--latent", *flags])
        config = vd.data_config(vd.config_from_flags(args), found, args.cond,
                                args.patch_size is not None)
        assert config.patch_size == patch, flags
        vd.check_model_shape(config)  # the shape the run would be refused for


def test_a_latent_run_samples_pictures_resumes_exactly_evaluates_and_shows(tiny_mnist, tmp_path,
                                                                          capsys, quick_show):
    latent = ["--cond", "--latent"]
    cut = train_tiny(tiny_mnist, tmp_path / "cut", *latent, steps=2)
    state, config = vd.load_checkpoint(cut)
    assert config.latent and config.patch_size == 2 and not config.clip_x0
    assert any(name.startswith("vae.") for name in state["ema"])  # the VAE, frozen, stored
    vd.main(["train", "--resume", "--data-dir", tiny_mnist, "--max-steps", "4", "--out-dir",
             str(tmp_path / "cut")])
    whole = train_tiny(tiny_mnist, tmp_path / "whole", *latent, steps=4)
    assert_same_state(torch.load(cut, weights_only=True), torch.load(whole, weights_only=True))
    model, scheduler, config, _, _ = vd.load_model(whole, "cpu")
    images = vd.generate(model, scheduler, config, torch.tensor([1, 2]), steps=3,
                         shape=vd.image_shape(config, 2), sampler="ddim")
    assert images.shape == (2, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    capsys.readouterr()
    vd.main(["evaluate", "--ckpt", whole, "--data-dir", tiny_mnist, "--per-label", "2",
             "--samplers", "ddim:3", "--guidance-scales", "1.5"])
    assert "through the VAE (its floor)" in capsys.readouterr().out
    vd.main(["show", "--ckpt", whole, "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "pictures")])
    assert sorted(os.listdir(tmp_path / "pictures")) == sorted(SHOW_FILES + ["6_latents.png"])
    vd.main(["sample", "--ckpt", whole, "--label", "3", "--n", "2", "--init-image",
             str(tmp_path / "pictures" / "4_few_steps.png"), "--output", str(tmp_path / "i.png")])
    for args, message in [(["--latent", "--latent-factor", "4", "--image-size", "30"],
                           "--latent-factor 4 must divide the image size 30"),
                          (["--latent", "--vanilla"], "--vanilla trains exactly Part I"),
                          (["--latent", "--latent-factor", "4", "--arch", "unet"],
                           "the 7-pixel latent does not")]:
        expect_one_line_error(["train", "--data-dir", tiny_mnist, "--out-dir",
                               str(tmp_path / "bad"), *args], message, capsys)
    expect_one_line_error(["sample", "--ckpt", whole, "--classifier-scale", "1"],
                          "needs a DDPM checkpoint in pixels", capsys, code=1)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# II.17's reflow
# ---------------------------------------------------------------------------------------------

def test_with_the_exact_velocity_one_euler_step_lands_on_the_coupled_image_on_a_straight_path():
    x_star = torch.randn(1, 1, 4, 4)                        # a data set of one image
    exact = lambda x, t: (x - x_star) / (t / (T - 1))        # v = (x_s − x*)/s: lines to x*
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x, straightness = vd.coupled_pairs(exact, z, 1, T)
    close(x, x_star.expand(3, -1, -1, -1), 1e-5)
    close(straightness, torch.zeros(3), 1e-10)
    curved = lambda x, t: x                                  # dx/ds = x: exponential paths
    assert (vd.coupled_pairs(curved, z, 8, T)[1] > 1e-3).all()
    config = vd.Config(objective="flow")
    model = lambda x_s, t, labels=None: exact(x_s, t.reshape(-1, 1, 1, 1))  # z − x on the line
    loss, _ = vd.flow_matching_loss(model, x_star.expand(3, -1, -1, -1), None, config,
                                    torch.Generator().manual_seed(1), noise=z)
    close(loss, torch.zeros(3), 1e-8)


def test_the_pairs_are_the_same_for_a_seed_and_an_interrupted_draw_continues(tiny_mnist,
                                                                             tmp_path,
                                                                             monkeypatch):
    flow = train_tiny(tiny_mnist, tmp_path / "flow", "--cond", "--objective", "flow", steps=1)
    teacher = vd.load_model(flow, "cpu")
    whole = vd.drawn_pairs(teacher, 40, str(tmp_path / "a"), seed=3, chunk=16)
    real, calls = vd.coupled_pairs, []

    def interrupted_on_the_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(vd, "coupled_pairs", interrupted_on_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        vd.drawn_pairs(teacher, 40, str(tmp_path / "b"), seed=3, chunk=16)
    assert torch.load(tmp_path / "b" / "pairs.pt", weights_only=True)["done"] == 16
    monkeypatch.setattr(vd, "coupled_pairs", real)
    again = vd.drawn_pairs(teacher, 40, str(tmp_path / "b"), seed=3, chunk=16)
    assert torch.equal(whole.noise, again.noise) and torch.equal(whole.pixels, again.pixels)
    assert whole.labels.tolist() == [k % 10 for k in range(40)]


def test_a_reflow_run_trains_from_its_teacher_and_samples_in_one_step(tiny_mnist, tmp_path,
                                                                       capsys):
    flow = train_tiny(tiny_mnist, tmp_path / "flow", "--cond", "--objective", "flow", steps=1)
    reflow = ["train", "--reflow-from", flow, "--pairs", "32", "--device", "cpu"]
    vd.main([*reflow, "--max-steps", "2", "--out-dir", str(tmp_path / "cut")])
    state, config = vd.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert config.pairs == 32 and config.reflow_from == flow and config.objective == "flow"
    vd.main(["train", "--resume", "--max-steps", "3", "--out-dir", str(tmp_path / "cut")])
    vd.main([*reflow, "--max-steps", "3", "--out-dir", str(tmp_path / "whole")])
    assert_same_state(torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True),
                      torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True))
    vd.main(["sample", "--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--steps", "1",
             "--label", "2", "--n", "4", "--output", str(tmp_path / "two.png")])
    assert png_size(tmp_path / "two.png") == (62, 62)
    capsys.readouterr()
    vd.main(["evaluate", "--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--data-dir", tiny_mnist,
             "--per-label", "2", "--samplers", "euler:1", "--guidance-scales", "1"])
    assert "straightness of 200 paths" in capsys.readouterr().out
    ddpm = train_tiny(tiny_mnist, tmp_path / "ddpm", "--cond", steps=1)
    for args, message in [(["--reflow-from", ddpm], "trained for DDPM"),
                          (["--reflow-from", flow, "--pairs", "0"], "--pairs: must be a positive"),
                          (["--reflow-from", str(tmp_path / "none.pt")], "no checkpoint at")]:
        expect_one_line_error(["train", "--out-dir", str(tmp_path / "bad"), *args], message,
                              capsys)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# II.18's consistency distillation, on Gaussian data, whose ODE map has a closed form: for
# x0 ~ N(μ, s²) per pixel, E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·μ)/(ᾱ·s² + 1 − ᾱ), and the ODE keeps
# each x_t's standard score, so its image is f*(x_t, t) = μ + s·(x_t − √ᾱ·μ)/√(ᾱ·s² + 1 − ᾱ).
# ---------------------------------------------------------------------------------------------

MU, S = 0.3, 0.5


def gaussian_noise(scheduler, x_t, t):
    """The exact E[ε | x_t] of Gaussian data."""
    alpha_bar = vd.per_sample(scheduler.alpha_bar, t, x_t).double()
    spread = alpha_bar * S**2 + 1 - alpha_bar
    return ((1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * MU) / spread).float()


def gaussian_map(scheduler, x_t, t):
    """f*(x_t, t): the exact image of x_t under the probability-flow ODE."""
    alpha_bar = vd.per_sample(scheduler.alpha_bar, t, x_t).double()
    spread = alpha_bar * S**2 + 1 - alpha_bar
    return (MU + S * (x_t - alpha_bar.sqrt() * MU) / spread.sqrt()).float()


def as_v_network(scheduler, f):
    """A network whose consistency function is f: v = (√ᾱ·x_t − f)/√(1−ᾱ)."""
    def network(x_t, t, labels=None):
        alpha_bar = vd.per_sample(scheduler.alpha_bar, t, x_t)
        return (alpha_bar.sqrt() * x_t - f(scheduler, x_t, t)) / (1 - alpha_bar).sqrt()
    return network


def test_one_evaluation_of_the_exact_consistency_function_is_the_whole_ode(scheduler):
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    f_net = as_v_network(scheduler, gaussian_map)
    f = lambda x_t, t: vd.consistency_function(f_net, scheduler, "v", x_t, torch.full((64,), t))
    one_step = f(x, T - 1)
    close(one_step, gaussian_map(scheduler, x, T - 1), 1e-4)
    denoise = lambda x_t, t: gaussian_noise(scheduler, x_t, t)
    errors = {}
    for steps in (250, T):                                           # DDIM with the exact ε
        grid = torch.linspace(T - 1, 0, steps).round().long().tolist()
        path = list(vd.ddim_sampler(denoise, scheduler, x, grid, clip_x0=False))
        errors[steps] = (path[-1] - one_step).abs().max().item()
    assert errors[T] < 0.01 and 3 < errors[250] / errors[T] < 5     # first order: error ∝ 1/n
    for t_mid in (700, 300, 50):                                     # f is constant on the path
        close(f(path[T - 2 - t_mid], t_mid), one_step, 0.01)        # path[k]: x at t = T−2−k


def test_the_consistency_loss_singles_out_the_ode_map_and_shrinks_with_a_finer_grid(scheduler):
    config = vd.Config(clip_x0=False)
    x0 = MU + S * torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    teacher = lambda x_t, t, labels: gaussian_noise(scheduler, x_t, t)
    tweedie = lambda scheduler, x_t, t: vd.predict_x0(scheduler, x_t, t,
                                                      gaussian_noise(scheduler, x_t, t))

    def mean_loss(f, steps):
        grid, generator = vd.consistency_grid(scheduler, steps), torch.Generator().manual_seed(2)
        return torch.stack([vd.consistency_loss(as_v_network(scheduler, f), teacher, scheduler,
                                                config, x0, None, grid, generator)[0].mean()
                            for _ in range(40)]).mean().item()
    exact_coarse, exact_fine = mean_loss(gaussian_map, 18), mean_loss(gaussian_map, 200)
    assert exact_fine < exact_coarse / 3                             # DDIM's error, shrinking
    assert mean_loss(tweedie, 18) > 3 * exact_coarse                 # E[x0 | x_t] is not it


def test_one_consistency_step_is_ddims_jump_and_two_keep_the_data_distribution(scheduler):
    x = torch.randn(4000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    denoise = lambda x_t, t: torch.tanh(x_t) * 0.7                    # any ε-network
    (jump,) = vd.ddim_sampler(denoise, scheduler, x, [T - 1])
    (step,) = vd.consistency_sampler(denoise, scheduler, x, [T - 1])
    close(step, jump, 1e-6)                                          # DDIM's one jump to x0
    exact = lambda x_t, t: vd.noise_from_x0(scheduler, x_t, t, gaussian_map(scheduler, x_t, t))
    samples = list(vd.consistency_sampler(exact, scheduler, x, [T - 1, 500], clip_x0=False,
                                          generator=torch.Generator().manual_seed(4)))[-1]
    n = samples.numel()
    assert abs(samples.mean().item() - MU) < 4 * S / math.sqrt(n)     # a mean of n draws
    assert abs(samples.std().item() - S) < 4 * S / math.sqrt(2 * n)   # and their spread


def test_a_distilled_run_resumes_exactly_and_samples_in_one_and_two_steps(tiny_mnist, tmp_path):
    teacher = train_tiny(tiny_mnist, tmp_path / "teacher", "--cond", steps=1)
    distill = ["train", "--distill-from", teacher, "--data-dir", tiny_mnist, "--device", "cpu",
               "--consistency-steps", "6"]
    vd.main([*distill, "--max-steps", "2", "--out-dir", str(tmp_path / "cut")])
    state, config = vd.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert config.distill_from == teacher and config.sampler == "consistency"
    assert config.guidance_scale == 1 and config.consistency_steps == 6
    vd.main(["train", "--resume", "--max-steps", "3", "--data-dir", tiny_mnist, "--out-dir",
             str(tmp_path / "cut")])
    vd.main([*distill, "--max-steps", "3", "--out-dir", str(tmp_path / "whole")])
    assert_same_state(torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True),
                      torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True))
    for steps in ("1", "2"):
        vd.main(["sample", "--ckpt", str(tmp_path / "whole" / "ckpt.pt"), "--steps", steps,
                 "--label", "2", "--n", "4", "--output", str(tmp_path / f"{steps}.png")])
        assert png_size(tmp_path / f"{steps}.png") == (62, 62)


def test_a_distillation_refuses_a_teacher_or_flags_it_cannot_use(tiny_mnist, tmp_path, capsys):
    flow = train_tiny(tiny_mnist, tmp_path / "flow", "--cond", "--objective", "flow", steps=1)
    eps = train_tiny(tiny_mnist, tmp_path / "eps", "--cond", "--prediction", "eps", steps=1)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(eps, "rb").read()[:500])
    for args, message in [([flow], "is a flow model"), ([eps], "predicts ε"),
                          ([str(tmp_path / "none.pt")], "no checkpoint at"),
                          ([str(truncated)], "not a readable VanillaDiffusion checkpoint"),
                          ([eps, "--reflow-from", flow], "give one"),
                          ([eps, "--objective", "flow"], "drop --objective")]:
        expect_one_line_error(["train", "--out-dir", str(tmp_path / "bad"), "--data-dir",
                               tiny_mnist, "--distill-from", *args], message, capsys)
    assert not (tmp_path / "bad").exists()


def test_a_distillation_resumes_only_from_the_teacher_it_started_from(tiny_mnist, tmp_path,
                                                                     capsys):
    teacher = train_tiny(tiny_mnist, tmp_path / "teacher", "--cond", steps=1)
    student = tmp_path / "student"
    vd.main(["train", "--distill-from", teacher, "--data-dir", tiny_mnist, "--max-steps", "1",
             "--out-dir", str(student), "--device", "cpu"])
    saved = (student / "ckpt.pt").read_bytes()
    train_tiny(tiny_mnist, tmp_path / "teacher", "--cond", "--overwrite", "--seed", "1", steps=1)
    expect_one_line_error(["train", "--resume", "--max-steps", "2", "--data-dir", tiny_mnist,
                           "--out-dir", str(student)], "is not the file this distillation", capsys)
    assert (student / "ckpt.pt").read_bytes() == saved


def test_a_consistency_model_refuses_other_samplers_and_guidance(tiny_mnist, tmp_path, capsys):
    teacher = train_tiny(tiny_mnist, tmp_path / "teacher", "--cond", steps=1)
    student = str(tmp_path / "student" / "ckpt.pt")
    vd.main(["train", "--distill-from", teacher, "--data-dir", tiny_mnist, "--max-steps", "1",
             "--out-dir", str(tmp_path / "student"), "--device", "cpu"])
    for args, message in [
            (["sample", "--ckpt", teacher, "--sampler", "consistency"], "needs a consistency"),
            (["sample", "--ckpt", student, "--sampler", "ddim"], "--sampler consistency, not"),
            (["sample", "--ckpt", student, "--guidance-scale", "2"], "no ∅ branch"),
            (["sample", "--ckpt", student, "--negative-label", "3", "--label", "1"],
             "no ∅ branch"),
            (["evaluate", "--ckpt", student, "--guidance-scales", "0,1"], "no ∅ branch"),
            (["sample", "--ckpt", student, "--classifier-scale", "2"], "Part II sampler")]:
        expect_one_line_error([*args, "--data-dir", tiny_mnist, *(
            ["--output", str(tmp_path / "x.png")] if args[0] == "sample" else [])], message,
            capsys)
    assert not (tmp_path / "x.png").exists()


def test_show_draws_a_consistency_model_beside_its_teacher(tiny_mnist, tmp_path, monkeypatch,
                                                          quick_show):
    teacher = train_tiny(tiny_mnist, tmp_path / "teacher", "--cond", steps=1)
    vd.main(["train", "--distill-from", teacher, "--data-dir", tiny_mnist, "--max-steps", "1",
             "--out-dir", str(tmp_path / "student"), "--device", "cpu"])
    row_names, sheet = [], vd.sheet
    monkeypatch.setattr(vd, "sheet", lambda title, rows, **options: row_names.append(
        [name for name, _ in rows]) or sheet(title, rows, **options))
    vd.main(["show", "--ckpt", str(tmp_path / "student" / "ckpt.pt"), "--data-dir", tiny_mnist,
             "--out-dir", str(tmp_path / "pictures"), "--device", "cpu"])
    assert sorted(os.listdir(tmp_path / "pictures")) == SHOW_FILES
    assert ["consistency", "teacher:\ndpm++2m-karras"] in row_names        # 4_few_steps.png


def test_the_readme_counts_each_parts_lines_as_they_are():
    import re
    lines = open(os.path.join(HERE, "vanilla_diffusion.py"), encoding="utf-8").read().splitlines()
    # each part opens at the ==== line above its "# Part" line, whose 0-based index is that
    # line's 1-based number
    starts = [next(i for i, line in enumerate(lines) if line.startswith(f"# Part {part} —"))
              for part in ("I", "II", "III")] + [len(lines) + 1]
    readme = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    for k, part in enumerate(("I", "II", "III")):
        first, last = starts[k], starts[k + 1] - 1
        row = re.search(rf"^\| {part}\. [^|]+\| (\d+)–(\d+) \(([\d,]+)\) \|", readme, re.M)
        assert row and row.groups() == (str(first), str(last), f"{last - first + 1:,}"), part
