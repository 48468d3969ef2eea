"""VanillaDiffusion: diffusion on MNIST in one file, read top to bottom.

Start here (the first command takes about 10 minutes on a laptop CPU):
    python vanilla_diffusion.py train --cond          # learn to draw digits; writes runs/ckpt.pt
    python vanilla_diffusion.py sample --label 4      # draw sixteen 4s into samples.png
    python vanilla_diffusion.py evaluate              # judge them: label accuracy, Fréchet distance

Contents, in the order the idea unfolds:
     1. Config             every default in one place
     2. Utilities          table lookups, seeded noise, pictures in and out, the user's mistakes
     3. Noise scheduler    forward (noise_image); reverse (sample_prev_image_distribution) and
                           its fast siblings (ddim_step, dpm_solver_step); rectified flow
     4. Model              a patchify DiT: self-attention over image patches,
                           cross-attention to the label, the timestep through adaLN-Zero
     5. Data               MNIST as one tensor in [−1, 1]
     6. Training objective Algorithm 1 of Ho et al. 2020, where t is drawn, label dropout, EMA
     7. Sampling           guidance (classifier-free, in an interval; autoguidance), one loop
                           per sampler (DDPM, DDIM, DPM-Solver++, Euler), image-to-image
     8. Checkpoints        durable saves; everything a run needs to continue exactly
     9. Training loop      the loop as stanzas, progress, Ctrl-C, a stop on divergence
    10. Evaluation         a small classifier judges the samples
    11. Command line       train / sample / evaluate; every input checked before work starts

Symbols used in the comments (paper → code):
    T                  → config.num_timesteps        t ∈ {0, …, T−1}, 0-based, indexes the tables
    β_t                → scheduler.betas
    α_t = 1 − β_t      → scheduler.alphas
    ᾱ_t = ∏_{s≤t} α_s  → scheduler.alpha_bar
    ε, ε_θ(x_t, t, c)  → noise, pred_noise
    w                  → guidance_scale
    η                  → eta (DDIM)
    λ_t = log(√ᾱ_t/√(1−ᾱ_t)) → scheduler.lambdas   half the log-SNR, DPM-Solver++'s time
    ∅                  → NULL_LABEL, the "no label" row of the label embedding
"""

import argparse
import copy
import functools
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # index 10 of the label embedding means "no label" (∅)


# ---------------------------------------------------------------------------------------------
# 1. Config
#    One dataclass holds every default; checkpoints store it, so `sample` rebuilds the model.
# ---------------------------------------------------------------------------------------------

@dataclass
class Config:
    # data
    image_size: int = 28            # MNIST is 28×28, one grey channel
    # noise schedule (DDPM, Ho et al. 2020)
    num_timesteps: int = 1000       # T
    beta_start: float = 1e-4        # β_0, the linear schedule of the DDPM paper
    beta_end: float = 0.02          # β_{T−1}
    objective: str = "eps"          # "eps": the DDPM noise schedule; "flow": rectified flow
    prediction: str = "v"           # DDPM only: the network outputs ε, or v (converted to ε)
    # model (DiT, Peebles & Xie 2023)
    cond: bool = False              # `train --cond`: cross-attention to a label
    patch_size: int = 4             # 4 → 7×7 = 49 tokens; 2 → 196 tokens, 3–5× slower on a CPU
    width: int = 64                 # D, the token width: small, so that 8 CPU minutes
    depth: int = 3                  #   buy many steps, which won at equal time (README: levers)
    heads: int = 2                  # attention heads, D / heads = 32 channels each
    mlp_ratio: int = 4              # MLP hidden width = mlp_ratio · D
    conv_channels: int = 16         # 3×3 conv stem and conv head around the DiT (0: none)
    label_tokens: int = 4           # tokens per label; with the timestep token, 5 keys
    # training
    batch_size: int = 32            # small batches, many steps: 4× the steps of 128, ~95% speed
    lr: float = 4e-3                # peak learning rate of AdamW (2e-3 and 8e-3 were worse)
    warmup_steps: int = 200         # linear warm-up, then cosine decay to 0
    epochs: int = 5                 # passes over the 60,000 images (~9 min on 2 CPU cores)
    label_drop: float = 0.1         # CFG needs the unconditional task too: p(label → ∅)
    ema_decay: float = 0.999        # sampling weights: θ_ema ← d·θ_ema + (1 − d)·θ
    min_snr_gamma: float = 0.0      # min-SNR-γ loss weight (Hang et al. 2023); 0: off, since
                                    #   it starves the high noise that t_sampling feeds
    t_sampling: str = "logsnr"      # "uniform" t (Ho et al.), or "logsnr": log SNR(t) ~ N(μ, σ²)
    logsnr_mean: float = -2.0       # μ: below SNR = 1, where a digit's shape is decided
    logsnr_std: float = 2.0         # σ: still reaches the low noise of thin strokes
    guide_at: float = 0.25          # unconditional: the EMA at this share of training is kept
                                    #   as the weak guide of autoguidance (0: none)
    # sampling
    guidance_scale: float = 1.5     # w in ε = ε_∅ + w·(ε_c − ε_∅); 1.5 measured best (README)
    guidance_low: float = 0.0       # guide only where t/(T−1) ∈ [low, high]; elsewhere w = 1
    guidance_high: float = 0.7      #   (guidance in a limited interval, Kynkäänniemi et al. 2024)
    autoguidance_scale: float = 4.0  # w in ε = ε_guide + w·(ε − ε_guide), unconditional models
    sampler: str = "dpm"            # "dpm", "ddim" (few steps) or "ddpm" (all T); flow: "euler"
    sample_steps: int = 10          # DPM-Solver++ 10 ≈ DDIM 20 (README); flow models take 20
    clip_x0: bool = True            # clamp the predicted x0 to [−1, 1] at each step


# ---------------------------------------------------------------------------------------------
# 2. Utilities
#    Small helpers the later sections lean on: table lookups, seeded noise, pictures.
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix; the command line prints it as one line and exits with 1."""


def first_line(error):
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"


def per_sample(table, t, x):
    """table[t] for an int or a [B] tensor t, shaped to broadcast against x [B, C, H, W]."""
    t = torch.as_tensor(t, device=table.device)
    return table[t].reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1] (or [1, 1, 1, 1])


def gaussian_like(x, generator=None):
    """z ~ N(0, I) shaped like x, drawn on the generator's device: a seed gives the same
    images on any device."""
    device = generator.device if generator is not None else x.device
    z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return z.to(x.device)


def to_pixels(x):
    """[−1, 1] → [0, 1] for saving: (x + 1) / 2, clamped; never min-max normalised (that
    hides range bugs)."""
    return ((x + 1) / 2).clamp(0, 1)


def save_grid(images, path, nrow):
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(to_pixels(images.float().cpu()), path, nrow=nrow)


def save_animation(frames, path, nrow, max_frames=60):
    """The denoising as a GIF: one grid per step (at most max_frames), the last held a second."""
    from PIL import Image
    from torchvision.utils import make_grid
    count = min(max_frames, len(frames))
    keep = torch.linspace(0, len(frames) - 1, count).round().long().unique().tolist()
    pictures = []
    for i in keep:
        grid = make_grid(to_pixels(frames[i].float().cpu()), nrow=nrow)  # [3, H, W] in [0, 1]
        grey = (grid[0] * 255).round().byte().numpy()
        pictures.append(Image.fromarray(grey, mode="L"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    held = pictures[1:] + [pictures[-1]] * 10
    pictures[0].save(path, save_all=True, append_images=held, duration=80, loop=0)


def load_init_image(path, size):
    """A grey picture for image-to-image, resized to size×size, as [1, 1, size, size] in [−1, 1]."""
    if not os.path.isfile(path):
        raise UserError(f"no init image at {path}")
    try:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        picture = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
    except Exception as error:
        raise UserError(f"could not read {path} as an image ({first_line(error)})") from None
    return pil_to_tensor(picture).float()[None] / 127.5 - 1


def format_seconds(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ---------------------------------------------------------------------------------------------
# 3. Noise scheduler: DDPM (Ho et al. 2020), DDIM (Song et al. 2021), rectified flow
#    Forward: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.  Reverse: one DDPM step, or one DDIM step.
# ---------------------------------------------------------------------------------------------

class NoiseScheduler(nn.Module):
    """The DDPM noise schedule and the steps that use it. A module only so that .to(device)
    moves its tables."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        super().__init__()
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas                                        # α_t = 1 − β_t
        alpha_bar = torch.cumprod(alphas, dim=0)                    # ᾱ_t = ∏_{s≤t} α_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        tables = {                                                  # ᾱ_{t−1}, with ᾱ_{−1} = 1
            "betas": betas,                                         # β_t, linear in t
            "alphas": alphas,
            "sqrt_alphas": alphas.sqrt(),                           # √α_t
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),                     # √ᾱ_t
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),     # √(1−ᾱ_t)
            "snr": alpha_bar / (1 - alpha_bar),                     # SNR(t) = ᾱ_t / (1−ᾱ_t)
            "lambdas": 0.5 * (alpha_bar / (1 - alpha_bar)).log(),   # λ_t = log(√ᾱ_t/√(1−ᾱ_t))
            # the posterior q(x_{t−1} | x_t, x0) = N(μ̃_t, β̃_t), eqs. 6–7 of Ho et al.:
            "posterior_mean_coef_x0": alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
            "posterior_mean_coef_xt": alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),   # β̃_t
        }
        for name, table in tables.items():  # computed in float64, kept in float32
            self.register_buffer(name, table.float(), persistent=False)
        self.num_timesteps = num_timesteps

    def noise_image(self, x0, t, noise=None):
        """Forward process q(x_t | x0) in one jump: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, ε ~ N(0, I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        signal_part = per_sample(self.sqrt_alpha_bar, t, x0) * x0
        noise_part = per_sample(self.sqrt_one_minus_alpha_bar, t, x0) * noise
        return signal_part + noise_part, noise

    def velocity(self, x0, t, noise):
        """The v-prediction target (Salimans & Ho 2022): v = √ᾱ_t·ε − √(1−ᾱ_t)·x0.
        At high noise v ≈ −x0: the network draws the image rather than guessing the noise."""
        sqrt_alpha_bar = per_sample(self.sqrt_alpha_bar, t, x0)
        sqrt_one_minus_alpha_bar = per_sample(self.sqrt_one_minus_alpha_bar, t, x0)
        return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0

    def noise_from_velocity(self, x_t, t, pred_velocity):
        """ε_θ = √ᾱ_t·v_θ + √(1−ᾱ_t)·x_t: a v-network feeds the same ε formulas as an ε-network."""
        sqrt_alpha_bar = per_sample(self.sqrt_alpha_bar, t, x_t)
        sqrt_one_minus_alpha_bar = per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
        return sqrt_alpha_bar * pred_velocity + sqrt_one_minus_alpha_bar * x_t

    def predict_x0(self, x_t, t, pred_noise):
        """Invert the forward process: x0 = (x_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t."""
        sqrt_one_minus_alpha_bar = per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
        sqrt_alpha_bar = per_sample(self.sqrt_alpha_bar, t, x_t)
        return (x_t - sqrt_one_minus_alpha_bar * pred_noise) / sqrt_alpha_bar

    def sample_prev_image_distribution(self, x_t, t, pred_noise, generator=None,
                                       posterior_variance=False, clip_x0=False):
        """One reverse step x_t → x_{t−1} ~ p_θ(x_{t−1} | x_t): Algorithm 2 of Ho et al. 2020.
        Its fast sibling, ddim_step below, takes the same x_t, t, ε_θ and jumps further."""
        # 1. the mean μ_θ(x_t, t)
        if clip_x0:
            # through the predicted x0, clamped to the data range (as the DDPM reference code
            # does): μ = coef_x0·x0 + coef_xt·x_t, the posterior mean μ̃_t of eq. 7
            x0 = self.predict_x0(x_t, t, pred_noise).clamp(-1, 1)
            coef_x0 = per_sample(self.posterior_mean_coef_x0, t, x_t)  # √ᾱ_{t−1}·β_t/(1−ᾱ_t)
            coef_xt = per_sample(self.posterior_mean_coef_xt, t, x_t)  # √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)
            mean = coef_x0 * x0 + coef_xt * x_t
        else:
            # directly: μ = 1/√α_t · (x_t − β_t/√(1−ᾱ_t) · ε_θ), eq. 11
            beta = per_sample(self.betas, t, x_t)
            noise_coef = beta / per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
            mean = (x_t - noise_coef * pred_noise) / per_sample(self.sqrt_alphas, t, x_t)
        # 2. the variance: σ_t² = β_t (the default), or the posterior variance β̃_t
        variance = per_sample(self.posterior_variance if posterior_variance else self.betas, t, x_t)
        # 3. x_{t−1} = μ + σ_t·z, with z = 0 at t = 0 (the last step adds no noise)
        z = gaussian_like(x_t, generator)
        not_last = (torch.as_tensor(t, device=x_t.device) > 0).float()
        not_last = not_last.reshape(-1, *([1] * (x_t.dim() - 1)))             # [B, 1, 1, 1]
        return mean + not_last * variance.sqrt() * z

    def ddim_step(self, x_t, t, t_prev, pred_noise, eta=0.0, generator=None, clip_x0=False):
        """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12); t_prev = −1 means "to x0".
        η = 0 is deterministic; η = 1 is DDPM with σ_t² = β̃_t when t_prev = t − 1."""
        alpha_bar = per_sample(self.alpha_bar, t, x_t)
        if t_prev >= 0:
            alpha_bar_prev = per_sample(self.alpha_bar, t_prev, x_t)
        else:
            alpha_bar_prev = torch.ones_like(alpha_bar)
        # 1. the predicted x0, optionally clamped; then the ε that matches the clamped x0
        x0 = self.predict_x0(x_t, t, pred_noise)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            sqrt_one_minus_alpha_bar = per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
            pred_noise = (x_t - alpha_bar.sqrt() * x0) / sqrt_one_minus_alpha_bar
        # 2. σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev), eq. 16
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
        sigma = sigma * (1 - alpha_bar / alpha_bar_prev).sqrt()
        # 3. x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·ε_θ + σ·z: the predicted x0, the direction
        #    pointing to x_t, and fresh noise
        direction = (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * pred_noise
        z = gaussian_like(x_t, generator) if eta > 0 else 0.0
        return alpha_bar_prev.sqrt() * x0 + direction + sigma * z

    def dpm_solver_step(self, x_t, t, t_next, x0, prev_x0=None, h_prev=None):
        """One DPM-Solver++(2M) step x_t → x_{t_next} (Lu et al. 2022, Algorithm 2) from the
        data prediction x0. With the previous step's x0 it is second order; without it, first
        order, and then exactly ddim_step with η = 0. Returns x_{t_next} and the step h."""
        # 1. the step size in half-log-SNR: h = λ_{t_next} − λ_t, λ = log(√ᾱ/√(1−ᾱ))
        h = self.lambdas[t_next] - self.lambdas[t]
        # 2. second order: D = (1 + 1/(2r))·x0 − 1/(2r)·x0_prev, with r = h_prev / h
        if prev_x0 is not None:
            r = h_prev / h
            x0 = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
        # 3. the exponential integrator: x_next = (σ_next/σ_t)·x_t − α_next·(e^{−h} − 1)·D,
        #    with α = √ᾱ and σ = √(1−ᾱ)
        sigma_ratio = self.sqrt_one_minus_alpha_bar[t_next] / self.sqrt_one_minus_alpha_bar[t]
        return sigma_ratio * x_t - self.sqrt_alpha_bar[t_next] * torch.expm1(-h) * x0, h


# Rectified flow (Liu et al. 2022; the logit-normal s of Esser et al. 2024): a straight line
# from data (s = 0) to noise (s = 1), s ∈ [0, 1].

def flow_interpolate(x0, s, noise):
    """x_s = (1 − s)·x0 + s·ε; the velocity along the line is v = dx_s/ds = ε − x0."""
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return (1 - s) * x0 + s * noise


def euler_step(x_s, s, s_next, velocity):
    """One Euler step of dx/ds = v from s to s_next (< s): x_{s_next} = x_s + (s_next − s)·v."""
    return x_s + (s_next - s) * velocity


# ---------------------------------------------------------------------------------------------
# 4. Model: a DiT noise predictor (Peebles & Xie 2023) with cross-attention to the label
#    Image patches become tokens; the timestep enters every block through adaLN-Zero; the
#    label's tokens are the keys and values of a cross-attention, as text is in Stable Diffusion.
# ---------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] → [B, dim] (Vaswani 2017)."""
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * steps)                        # [dim/2]
    angles = t.float()[:, None] * freqs[None]                               # [B, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)        # [B, dim]


def position_embedding_2d(grid, dim):
    """Fixed 2-D sine-cosine positions (as in DiT and MAE): half the channels for the row,
    half for the column; so dim must be divisible by 4."""
    axis = timestep_embedding(torch.arange(grid, dtype=torch.float32), dim // 2)  # [grid, D/2]
    rows = axis[:, None].expand(grid, grid, -1)                                  # [grid, grid, D/2]
    cols = axis[None].expand(grid, grid, -1)                                     # [grid, grid, D/2]
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)             # [N, D]


def patchify(images, patch_size):
    """[B, C, H, W] → [B, N, C·p·p], N = (H/p)·(W/p), patches in row-major order."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)                  # [B, C, h, p, w, p]
    x = x.permute(0, 2, 4, 1, 3, 5)                                 # [B, h, w, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)             # [B, N, C·p·p]


def unpatchify(tokens, patch_size, channels=1):
    """[B, N, C·p·p] → [B, C, H, W], the inverse of patchify for a square image."""
    B, N, _ = tokens.shape
    p, grid = patch_size, math.isqrt(N)
    x = tokens.reshape(B, grid, grid, channels, p, p)               # [B, h, w, C, p, p]
    x = x.permute(0, 3, 1, 4, 2, 5)                                 # [B, C, h, p, w, p]
    return x.reshape(B, channels, grid * p, grid * p)               # [B, C, H, W]


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, with shift and scale computed from the timestep."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)·V. Self-attention when context is x,
    cross-attention otherwise."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x):
        B, L, D = x.shape
        return x.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)  # [B, h, L, D/h]

    def project(self, x, context):
        q = self.split_heads(self.to_q(x))                  # [B, h, N, d]  queries: image tokens
        k, v = self.to_kv(context).chunk(2, dim=-1)         # [B, M, D] each: from the context
        return q, self.split_heads(k), self.split_heads(v)  # keys and values [B, h, M, d]

    def forward(self, x, context):
        y = F.scaled_dot_product_attention(*self.project(x, context))   # [B, h, N, d]
        return self.out(y.transpose(1, 2).flatten(2))                   # [B, N, D]

    def attention_weights(self, x, context):
        """softmax(QKᵀ/√d) [B, h, N, M], what forward() computes inside SDPA, written out."""
        q, k, _ = self.project(x, context)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def layer_norm(dim):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # adaLN supplies scale, shift


class DiTBlock(nn.Module):
    """Three residual sub-layers: self-attention, cross-attention to the condition, MLP.

    adaLN-Zero: the timestep sets a shift, scale and gate for each sub-layer; the gates start
    at 0, so every block starts as the identity. The unconditional model has no cross-attention.
    """

    def __init__(self, dim, heads, mlp_ratio, cross_attention):
        super().__init__()
        self.norm_self, self.self_attn = layer_norm(dim), Attention(dim, heads)
        self.norm_cross = layer_norm(dim) if cross_attention else None
        self.cross_attn = Attention(dim, heads) if cross_attention else None
        self.norm_mlp = layer_norm(dim)
        hidden = mlp_ratio * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, dim))
        self.num_sublayers = 3 if cross_attention else 2
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * self.num_sublayers * dim))
        nn.init.zeros_(self.ada_ln[1].weight)  # adaLN-Zero: gates, shifts, scales start at 0
        nn.init.zeros_(self.ada_ln[1].bias)

    def forward(self, x, time_emb, cond_tokens=None):
        # x: [B, N, D] image tokens; time_emb: [B, D]; cond_tokens: [B, M, D]
        modulation = self.ada_ln(time_emb)[:, None].chunk(3 * self.num_sublayers, dim=-1)
        shift_sa, scale_sa, gate_sa = modulation[0:3]       # [B, 1, D] each: self-attention
        shift_mlp, scale_mlp, gate_mlp = modulation[3:6]    # MLP
        h = modulate(self.norm_self(x), shift_sa, scale_sa)
        x = x + gate_sa * self.self_attn(h, h)                          # [B, N, D] image ↔ image
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = modulation[6:9]   # cross-attention
            h = modulate(self.norm_cross(x), shift_ca, scale_ca)
            x = x + gate_ca * self.cross_attn(h, cond_tokens)           # [B, N, D] Q image, KV cond
        h = modulate(self.norm_mlp(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)                               # [B, N, D]


class DiT(nn.Module):
    """ε_θ(x_t, t, c): noisy image, timestep and label in; predicted noise (or v) out."""

    def __init__(self, config):
        super().__init__()
        D, p, C = config.width, config.patch_size, config.conv_channels
        self.config = config
        if C:  # local pixel features at full resolution around the transformer (a U-Net skip)
            self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(C, C, 3, padding=1))
            self.head = nn.Sequential(nn.Conv2d(2 * C, C, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(C, 1, 3, padding=1))
        self.pixel_channels = C or 1
        self.patch_embed = nn.Linear(self.pixel_channels * p * p, D)  # a p×p patch → a token
        positions = position_embedding_2d(config.image_size // p, D)[None]       # [1, N, D]
        self.register_buffer("pos_embed", positions, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        if config.cond:
            # 11 rows (digits 0–9 and ∅), each `label_tokens` tokens for the cross-attention;
            # N(0, 1) rows are as loud as the timestep token beside them, so the label is heard
            self.label_embed = nn.Embedding(NUM_CLASSES + 1, config.label_tokens * D)
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_ratio, config.cond)
                                    for _ in range(config.depth))
        self.final_norm = layer_norm(D)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, self.pixel_channels * p * p)
        last = self.head[-1] if C else self.final_linear
        for layer in (self.final_ada_ln[1], last):  # adaLN-Zero: the model starts at 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_tokens(self, labels, time_emb):
        """The cross-attention's keys and values: the label's tokens and the timestep token."""
        B, D = time_emb.shape
        label_tokens = self.label_embed(labels).reshape(B, self.config.label_tokens, D)
        return torch.cat([label_tokens, time_emb[:, None]], dim=1)       # [B, L+1, D]

    def forward(self, x_t, t, labels=None):
        # x_t: [B, 1, 28, 28]; t: [B] in [0, T−1] (fractional for flow); labels: [B] in 0..10
        p, has_conv = self.config.patch_size, self.config.conv_channels > 0
        pixels = self.stem(x_t) if has_conv else x_t                     # [B, C, 28, 28]
        x = self.patch_embed(patchify(pixels, p)) + self.pos_embed       # [B, N, D], N = (28/p)²
        time_emb = self.time_mlp(timestep_embedding(t, x.shape[-1]))     # [B, D]
        cond = None
        if self.config.cond:
            cond = self.condition_tokens(labels, time_emb)               # [B, M, D]
        for block in self.blocks:
            x = block(x, time_emb, cond)                                 # [B, N, D]
        shift, scale = self.final_ada_ln(time_emb)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))     # [B, N, C·p·p]
        x = unpatchify(x, p, self.pixel_channels)                        # [B, C, 28, 28]
        if has_conv:
            x = self.head(torch.cat([x, pixels], dim=1))                 # [B, 1, 28, 28]
        return x


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 5. Data
#    MNIST as one tensor in [−1, 1] on the training device: a batch is an index lookup.
# ---------------------------------------------------------------------------------------------

def load_mnist(data_dir, train=True, device="cpu"):
    """Images [N, 1, 28, 28] in [−1, 1] and labels [N]; downloaded into data_dir if missing."""
    from torchvision.datasets import MNIST
    try:
        dataset = MNIST(root=data_dir, train=train, download=True)
    except Exception as error:  # no network, a proxy, a half-written file: say where we looked
        raw = os.path.join(data_dir, "MNIST", "raw")
        raise UserError(f"MNIST is not in {raw} and could not be downloaded "
                        f"({first_line(error)}); pass --data-dir pointing at a "
                        f"folder that holds MNIST/raw") from None
    pixels = dataset.data.to(device=device, dtype=torch.float32)[:, None]   # [N, 1, 28, 28]
    return pixels / 127.5 - 1, dataset.targets.to(device)                   # x0 ∈ [−1, 1]


# ---------------------------------------------------------------------------------------------
# 6. Training objective: Algorithm 1 (training) of Ho et al. 2020, with label dropout for CFG
#    Draw x0, t, ε; build x_t with noise_image; regress the network onto ε (or onto v).
# ---------------------------------------------------------------------------------------------

def drop_labels(labels, p, generator=None):
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes ∅ with
    probability p, so one network also learns the unconditional task."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)


def min_snr_weight(snr, gamma, prediction):
    """min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for an ε-loss, min(SNR, γ)/(SNR + 1)
    for a v-loss (the same weight on ‖x0 − x̂0‖² either way); γ = 0 switches it off."""
    if gamma <= 0:
        return torch.ones_like(snr)
    denominator = snr if prediction == "eps" else snr + 1
    return snr.clamp(max=gamma) / denominator


def sample_timesteps(scheduler, batch_size, config, generator=None):
    """Where training spends its steps. Algorithm 1 of Ho et al. draws t uniformly; with the
    linear β, half of those t have SNR < 0.09, where a min-SNR weight is below 0.09. "logsnr"
    draws log SNR ~ N(μ, σ²) instead (the log-normal of EDM, Karras et al. 2022) and takes the
    first t whose log SNR is at most the draw: with μ = −2, σ = 2, 77% of the steps land in
    t ∈ [300, 800), where a digit's shape is decided (README: where the loss is spent)."""
    device = scheduler.lambdas.device
    if config.t_sampling == "uniform":
        return torch.randint(0, config.num_timesteps, (batch_size,), device=device,
                             generator=generator)
    log_snr = torch.randn(batch_size, device=device, generator=generator)
    log_snr = config.logsnr_mean + config.logsnr_std * log_snr      # log SNR ~ N(μ, σ²)
    log_snr_table = 2 * scheduler.lambdas                           # log SNR_t, falling in t
    t = torch.searchsorted(-log_snr_table, -log_snr)                # first t: log SNR_t ≤ draw
    return t.clamp(max=config.num_timesteps - 1)


def denoising_loss(model, scheduler, x0, labels, config, generator=None):
    """Algorithm 1 of Ho et al. 2020 with t from sample_timesteps: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε,
    loss ‖ε − ε_θ(x_t, t, c)‖² (or ‖v − v_θ‖²), times the min-SNR weight when γ > 0.
    Returns the per-image loss [B] and t/T [B]."""
    B, device = x0.shape[0], x0.device
    t = sample_timesteps(scheduler, B, config, generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    x_t, _ = scheduler.noise_image(x0, t, noise)
    target = noise if config.prediction == "eps" else scheduler.velocity(x0, t, noise)
    per_image = (model(x_t, t, labels) - target).pow(2).mean(dim=(1, 2, 3))        # [B]
    weight = min_snr_weight(scheduler.snr[t], config.min_snr_gamma, config.prediction)
    return weight * per_image, t.float() / config.num_timesteps


def flow_matching_loss(model, x0, labels, config, generator=None):
    """Rectified flow: s ~ sigmoid(N(0, 1)) (logit-normal), x_s = (1−s)·x0 + s·ε, target
    v = ε − x0; the network reads s as t = s·(T−1). Returns the loss [B] and s [B]."""
    B, device = x0.shape[0], x0.device
    s = torch.sigmoid(torch.randn(B, device=device, generator=generator))
    noise = torch.randn(x0.shape, device=device, generator=generator)
    pred_velocity = model(flow_interpolate(x0, s, noise), s * (config.num_timesteps - 1), labels)
    return (pred_velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3)), s


def training_loss(model, scheduler, x0, labels, config, generator=None):
    """The loss of one batch: per-image [B], and each image's noise level in [0, 1) [B]."""
    if config.cond:
        labels = drop_labels(labels, config.label_drop, generator)
    else:
        labels = None  # the unconditional model never sees a label
    if config.objective == "flow":
        return flow_matching_loss(model, x0, labels, config, generator)
    return denoising_loss(model, scheduler, x0, labels, config, generator)


def learning_rate(step, total_steps, config):
    """Linear warm-up to config.lr, then cosine decay to 0 at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)  # θ_ema ← d·θ_ema + (1 − d)·θ


def ema_decay_at(step, config):
    """EMA warm-up: d = (1 + s)/(10 + s) at step s, an average over about the last s/9 steps,
    capped at config.ema_decay (reached after ~9,000 steps). A run of the defaults averages its
    last ninth; the last third measured worse, the last 29th the same (README: levers)."""
    return min(config.ema_decay, (1 + step) / (10 + step))


def update_averages(run, config, total_steps):
    """The EMA of the weights, which sampling uses; for an unconditional model also, once, a
    frozen early copy of it: the weak guide of autoguidance (Karras et al. 2024)."""
    update_ema(run.ema, run.model, ema_decay_at(run.step, config))
    if not config.cond and run.step + 1 == round(config.guide_at * total_steps):
        run.guide = copy.deepcopy(run.ema).eval()


# ---------------------------------------------------------------------------------------------
# 7. Sampling: classifier-free guidance (Ho & Salimans 2022), negative labels, image-to-image
#    (Meng et al. 2022, SDEdit). Each sampler is one loop that yields x after every step.
# ---------------------------------------------------------------------------------------------

def guided_prediction(model, x, t, labels, guidance_scale, negative_labels=None, guide=None):
    """ε = ε_∅ + w·(ε_c − ε_∅) on the whole output, from one batched pass of [cond; uncond].

    w = 0 is the unconditional model, w = 1 the conditional one, w > 1 pushes toward the label.
    With negative labels the "unconditional" branch is conditioned on them: pushed away.
    An unconditional model with a guide (a weaker version of itself) gets autoguidance
    (Karras et al. 2024), the same formula: ε = ε_guide + w·(ε − ε_guide).
    """
    if guidance_scale == 1 or (labels is None and guide is None):  # the model alone: one pass
        return model(x, t, labels)
    if labels is None:  # autoguidance
        pred_guide = guide(x, t, None)
        return pred_guide + guidance_scale * (model(x, t, None) - pred_guide)
    if negative_labels is None:
        uncond_labels = torch.full_like(labels, NULL_LABEL)
    else:
        uncond_labels = negative_labels
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, uncond_labels]))
    pred_cond, pred_uncond = both.chunk(2)                              # [B, 1, 28, 28] each
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


class Denoiser:
    """What a sampler asks the network: x and t in, the guided ε_θ(x_t, t) out.

    A v-network's output is turned into ε here, so every sampler uses the ε formulas.
    For a flow model the output is the velocity v_θ, and t = s·(T−1).
    """

    def __init__(self, model, scheduler, config, labels, guidance_scale, negative_labels=None,
                 guidance_interval=(0.0, 1.0), guide=None):
        self.model, self.scheduler, self.config = model, scheduler, config
        self.labels, self.negative_labels, self.guide = labels, negative_labels, guide
        self.guidance_scale, self.guidance_interval = guidance_scale, guidance_interval

    def guidance_at(self, t):
        """Guidance in a limited interval (Kynkäänniemi et al. 2024): w where t/(T−1) lies in
        [low, high], 1 (the model alone, one pass) elsewhere."""
        low, high = self.guidance_interval
        inside = low <= t / (self.config.num_timesteps - 1) <= high
        return self.guidance_scale if inside else 1.0

    def __call__(self, x, t):
        t_batch = torch.full((len(x),), float(t), device=x.device)     # [B]
        output = guided_prediction(self.model, x, t_batch, self.labels, self.guidance_at(t),
                                   self.negative_labels, self.guide)
        if self.config.objective == "eps" and self.config.prediction == "v":
            return self.scheduler.noise_from_velocity(x, t, output)     # ε_θ from v_θ
        return output


def sampling_timesteps(start_t, steps):
    """`steps` integer timesteps from start_t down to 0, evenly spaced, no repeats."""
    return torch.linspace(start_t, 0, steps).round().long().unique_consecutive().tolist()


def log_snr_timesteps(scheduler, start_t, steps):
    """`steps` integer timesteps from start_t down to 0, evenly spaced in λ = ½·log SNR: even
    steps for a solver that steps in λ (even t puts the last step from t ≈ 50 to 0 at h ≈ 3.6,
    seven times the others, and a second-order step extrapolates wildly there)."""
    lambdas = scheduler.lambdas.double().cpu()                          # increasing as t falls
    targets = torch.linspace(lambdas[start_t].item(), lambdas[0].item(), steps)
    t = torch.searchsorted(-lambdas, -targets.double()).clamp(0, start_t)
    return t.unique_consecutive().tolist()


def ddpm_sampler(denoise, scheduler, x, start_t, generator=None, clip_x0=True):
    """Algorithm 2 of Ho et al. 2020: every t from start_t down to 0."""
    for t in range(start_t, -1, -1):
        pred_noise = denoise(x, t)                                      # ε_θ(x_t, t)
        x = scheduler.sample_prev_image_distribution(x, t, pred_noise, generator,
                                                     clip_x0=clip_x0)
        yield x                                                         # x_{t−1}


def ddim_sampler(denoise, scheduler, x, timesteps, clip_x0=True):
    """DDIM with η = 0 (Song et al. 2021): a few of the T timesteps, deterministic."""
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):             # the last step goes to x0
        pred_noise = denoise(x, t)                                      # ε_θ(x_t, t)
        x = scheduler.ddim_step(x, t, t_prev, pred_noise, clip_x0=clip_x0)
        yield x                                                         # x_{t_prev}


def dpm_solver_sampler(denoise, scheduler, x, timesteps, clip_x0=True):
    """DPM-Solver++(2M) (Lu et al. 2022): DDIM's step plus a second-order correction from the
    previous step's x0, so 10 steps do the work of DDIM's 20. The last step lands on x0."""
    prev_x0, h_prev = None, None
    for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
        x0 = scheduler.predict_x0(x, t, denoise(x, t))                 # x0_θ(x_t, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if t_next < 0:
            x = x0                                                      # σ = 0: the data itself
        else:
            x, h = scheduler.dpm_solver_step(x, t, t_next, x0, prev_x0, h_prev)
            prev_x0, h_prev = x0, h
        yield x                                                         # x_{t_next}


def euler_sampler(denoise, x, s_grid, num_timesteps):
    """Rectified flow: integrate dx/ds = v_θ(x, s) down the grid s_0 > s_1 > … > 0."""
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        velocity = denoise(x, s * (num_timesteps - 1))                  # v_θ(x_s, s)
        x = euler_step(x, s, s_next, velocity)
        yield x                                                         # x_{s_next}


def noised_start(scheduler, config, init_images, strength, noise):
    """Image-to-image's starting point: the picture noised to t = strength·(T−1) (for a flow
    model: moved to s = strength along the straight line)."""
    if config.objective == "flow":
        s = torch.full((len(init_images),), strength, device=init_images.device)
        return flow_interpolate(init_images, s, noise)                  # x_s = (1−s)·x0 + s·ε
    start_t = round(strength * (config.num_timesteps - 1))
    return scheduler.noise_image(init_images, start_t, noise)[0]        # x_t = √ᾱ·x0 + √(1−ᾱ)·ε


@torch.no_grad()
def generate(model, scheduler, config, labels, *, shape, guidance_scale, sampler, steps,
             negative_labels=None, init_images=None, strength=1.0, generator=None, frames=None,
             guidance_interval=None, guide=None):
    """Draw images from noise (or from a noised init image): [B, 1, 28, 28] in [−1, 1].
    frames, if a list, receives x after every step (for the animation)."""
    device = next(model.parameters()).device
    if guidance_interval is None:
        guidance_interval = (config.guidance_low, config.guidance_high)
    denoise = Denoiser(model, scheduler, config, labels, guidance_scale, negative_labels,
                       guidance_interval, guide)
    x = gaussian_like(torch.empty(shape, device=device), generator)     # x_T ~ N(0, I)
    if init_images is not None:
        x = noised_start(scheduler, config, init_images, strength, x)
    start_t = round(strength * (config.num_timesteps - 1))
    if sampler == "ddpm":
        loop = ddpm_sampler(denoise, scheduler, x, start_t, generator, config.clip_x0)
    elif sampler == "ddim":
        timesteps = sampling_timesteps(start_t, steps)
        loop = ddim_sampler(denoise, scheduler, x, timesteps, config.clip_x0)
    elif sampler == "dpm":
        timesteps = log_snr_timesteps(scheduler, start_t, steps)
        loop = dpm_solver_sampler(denoise, scheduler, x, timesteps, config.clip_x0)
    else:
        s_grid = torch.linspace(strength, 0, steps + 1).tolist()
        loop = euler_sampler(denoise, x, s_grid, config.num_timesteps)
    for x in loop:
        if frames is not None:
            frames.append(x)
    return x


def default_sampler(config):
    return "euler" if config.objective == "flow" else config.sampler


def default_steps(sampler, config):
    return config.num_timesteps if sampler == "ddpm" else config.sample_steps


def default_guidance_scale(config):
    """CFG's w for a conditional model, autoguidance's w for an unconditional one."""
    return config.guidance_scale if config.cond else config.autoguidance_scale


def save_sample_grid(model, scheduler, config, path, guide=None, per_digit=8, seed=0):
    """The picture written after each epoch: a row per digit (an 8×8 grid if unconditional)."""
    device = next(model.parameters()).device
    model.eval()
    labels = None
    if config.cond:
        labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_digit)
    count = len(labels) if config.cond else 64
    sampler = default_sampler(config)
    images = generate(model, scheduler, config, labels, shape=(count, 1, 28, 28),
                      guidance_scale=default_guidance_scale(config), sampler=sampler,
                      steps=default_steps(sampler, config), guide=guide,
                      generator=torch.Generator().manual_seed(seed))
    save_grid(images, path, nrow=per_digit if config.cond else 8)
    model.train()


# ---------------------------------------------------------------------------------------------
# 8. Checkpoints
#    Written durably (fsync, then an atomic rename), only from finite weights, and holding
#    every random state of the run, so that --resume continues it bit for bit.
# ---------------------------------------------------------------------------------------------

def durable_save(state, path):
    """torch.save to a temporary file, flushed to disk, then renamed over `path`: a crash or a
    power cut leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(folder_fd)
        os.close(folder_fd)


def all_finite(module):
    tensors = [value for value in module.state_dict().values() if value.is_floating_point()]
    return all(torch.isfinite(value).all() for value in tensors)


def save_checkpoint(path, run, config, seed):
    """The model, its EMA, the optimizer, the config, the step and the random states."""
    if not (all_finite(run.model) and all_finite(run.ema)):
        raise UserError(f"refusing to save non-finite weights over {path}")
    state = {"model": run.model.state_dict(), "ema": run.ema.state_dict(),
             "optimizer": run.optimizer.state_dict(), "config": asdict(config),
             "step": run.step, "seed": seed, "generator": run.generator.get_state(),
             "guide": None if run.guide is None else run.guide.state_dict()}
    durable_save(state, path)


# A checkpoint written before a field existed means what the file did then.
BEFORE_FIELD_EXISTED = {"guidance_low": 0.0, "guidance_high": 1.0, "guide_at": 0.0,
                        "t_sampling": "uniform"}


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; make one with `python vanilla_diffusion.py "
                        f"train --cond` (it writes runs/ckpt.pt) or pass --ckpt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        config = Config(**{**BEFORE_FIELD_EXISTED, **state["config"]})
    except Exception as error:
        raise UserError(f"{path} is not a readable VanillaDiffusion checkpoint "
                        f"({first_line(error)})") from None
    return state, config


def load_guide(state, config, device):
    """The autoguidance guide stored in a checkpoint, or None."""
    if state.get("guide") is None:
        return None
    guide = DiT(config).to(device)
    guide.load_state_dict(state["guide"])
    return guide.eval()


def build_model(config, device):
    scheduler = NoiseScheduler(config.num_timesteps, config.beta_start, config.beta_end)
    return DiT(config).to(device), scheduler.to(device)


def load_model(path, device):
    """The EMA weights of a checkpoint in a model rebuilt from its stored config."""
    state, config = load_checkpoint(path, device)
    model, scheduler = build_model(config, device)
    try:
        model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError) as error:
        raise UserError(f"the weights in {path} do not fit the model its config describes "
                        f"(made by another version of this file?): {first_line(error)}") from None
    return model.eval(), scheduler, config, state


# ---------------------------------------------------------------------------------------------
# 9. Training loop
#    Algorithm 1 as stanzas (nanoGPT style); around it, small functions that start or restore
#    a run, print progress, stop cleanly on Ctrl-C and stop at once if the loss diverges.
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run needs to continue exactly where it stopped."""
    model: nn.Module
    ema: nn.Module             # the weights used for sampling
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of training: t, ε, label dropout
    step: int = 0
    guide: nn.Module = None    # unconditional: a frozen early copy of the EMA (autoguidance)


def start_run(config, device, seed, checkpoint=None, path=""):
    """A new run from `seed`, or the run stored in `checkpoint` restored exactly; and the
    noise scheduler it trains with."""
    scheduler = NoiseScheduler(config.num_timesteps, config.beta_start, config.beta_end).to(device)
    torch.manual_seed(seed)
    model = DiT(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    run = Run(model.train(), ema, optimizer, torch.Generator(device).manual_seed(seed))
    if checkpoint is None:  # model.train(): label dropout is in training_loss, nothing else differs
        return run, scheduler
    try:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        run.generator.set_state(checkpoint["generator"].cpu())
        run.guide = load_guide(checkpoint, config, device)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise UserError(f"cannot resume from {path}: {first_line(error)}") from None
    run.step = checkpoint["step"]
    return run, scheduler


@functools.lru_cache(maxsize=1)
def shuffled_order(num_images, seed, epoch):
    """A fresh shuffle each epoch, seeded by (seed, epoch): a resumed run continues it."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + epoch))


def batch_indices(step, batch_size, num_images, seed):
    """The images of a step: the next slice of its epoch's shuffled order."""
    epoch, index_in_epoch = divmod(step, num_images // batch_size)
    first = index_in_epoch * batch_size
    return shuffled_order(num_images, seed, epoch)[first:first + batch_size]


class StopOnCtrlC:
    """The first Ctrl-C lets the current step finish, so the saved state is whole and the run
    resumes exactly; a second Ctrl-C stops at once."""

    def __enter__(self):
        self.pressed, self.previous = False, None
        try:
            self.previous = signal.signal(signal.SIGINT, self.press)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            pass
        return self

    def press(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exception):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Progress:
    """A line every few seconds (step, loss, lr, images/s, ETA) and, per epoch, the loss per
    tenth of t: the README lists reference values to compare with."""

    def __init__(self, first_step, total_steps, batch_size, num_images, device):
        self.first_step, self.total_steps, self.batch_size = first_step, total_steps, batch_size
        self.steps_per_epoch = num_images // batch_size
        self.started = self.last_print = time.time()
        self.bucket_loss = torch.zeros(10, device=device)    # summed loss per tenth of t
        self.bucket_count = torch.zeros(10, device=device)

    def epoch_ended(self, step):
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def update(self, step, loss, per_image, noise_level, lr):
        buckets = (noise_level * 10).long().clamp(0, 9)
        self.bucket_loss.index_add_(0, buckets, per_image.detach().float())
        self.bucket_count.index_add_(0, buckets, torch.ones_like(per_image))
        now = time.time()
        if now - self.last_print < 5 and step < self.total_steps:
            return
        rate = (step - self.first_step) * self.batch_size / max(now - self.started, 1e-9)
        eta = (self.total_steps - step) * self.batch_size / max(rate, 1e-9)
        epoch = step / self.steps_per_epoch
        print(f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss {loss:.4f}  lr {lr:.2e}  "
              f"{rate:.0f} img/s  ETA {format_seconds(eta)}", flush=True)
        self.last_print = now

    def print_loss_per_tenth_of_t(self):
        means = (self.bucket_loss / self.bucket_count.clamp(min=1)).tolist()
        overall = (self.bucket_loss.sum() / self.bucket_count.sum().clamp(min=1)).item()
        print(f"mean loss {overall:.4f}; per tenth of t (low noise → high noise): "
              + " ".join(f"{value:.3f}" for value in means), flush=True)
        self.bucket_loss.zero_()
        self.bucket_count.zero_()


def stop_if_diverged(loss, grad_norm, step, lr, ckpt_path):
    """A non-finite loss or gradient stops the run before the weights are touched."""
    if torch.isfinite(loss) and torch.isfinite(grad_norm):
        return
    raise UserError(f"training diverged at step {step}: the loss is {loss.item():.3g} at "
                    f"learning rate {lr:.3g}; nothing was saved and {ckpt_path} (if any) keeps "
                    f"the last good weights; try a smaller --lr")


def end_of_epoch(run, config, scheduler, out_dir, seed, progress):
    """Print the loss per tenth of t, save the checkpoint and a grid of samples."""
    progress.print_loss_per_tenth_of_t()
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(ckpt_path, run, config, seed)
    grid_path = os.path.join(out_dir, f"samples_step{run.step:06d}.png")
    save_sample_grid(run.ema, scheduler, config, grid_path, run.guide)
    print(f"saved {ckpt_path} and {grid_path}", flush=True)


def train(config, images, labels, *, out_dir, total_steps, seed=0, checkpoint=None):
    """Algorithm 1 for total_steps; returns the Run (short of total_steps after a Ctrl-C)."""
    device, ckpt_path = images.device, os.path.join(out_dir, "ckpt.pt")
    run, scheduler = start_run(config, device, seed, checkpoint, ckpt_path)
    progress = Progress(run.step, total_steps, config.batch_size, len(images), device)
    with StopOnCtrlC() as ctrl_c:
        while run.step < total_steps and not ctrl_c.pressed:

            # draw the batch: the indices of this step's images and labels
            batch = batch_indices(run.step, config.batch_size, len(images), seed).to(device)

            # set the learning rate for this step: linear warm-up, then cosine decay
            lr = set_learning_rate(run.optimizer, learning_rate(run.step, total_steps, config))

            # forward, backward, update; a non-finite loss stops before the weights change
            per_image, noise_level = training_loss(run.model, scheduler, images[batch],
                                                   labels[batch], config, run.generator)
            loss = per_image.mean()
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
            stop_if_diverged(loss, grad_norm, run.step, lr, ckpt_path)
            run.optimizer.step()

            # the exponential moving average of the weights (and the guide of autoguidance)
            update_averages(run, config, total_steps)
            run.step += 1

            # progress, and at the end of each epoch a checkpoint and a picture
            progress.update(run.step, loss.item(), per_image, noise_level, lr)
            if progress.epoch_ended(run.step):
                end_of_epoch(run, config, scheduler, out_dir, seed, progress)
    if run.step < total_steps:  # Ctrl-C: the step in flight finished, so the state is whole
        save_checkpoint(ckpt_path, run, config, seed)
    return run


# ---------------------------------------------------------------------------------------------
# 10. Evaluation: how good are the samples?
#     A small CNN checks that each sample shows its label; its features give a Fréchet
#     distance to real digits (the FID formula of Heusel et al. 2017, with an MNIST network).
# ---------------------------------------------------------------------------------------------

def conv_block(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.MaxPool2d(2)]


class Classifier(nn.Module):
    """A small CNN for MNIST (> 99% test accuracy after two epochs); features() is its 128-d
    penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(*conv_block(1, 32), *conv_block(32, 64),       # 28 → 14 → 7
                                  *conv_block(64, 128), nn.Flatten(),            # → 3
                                  nn.Linear(128 * 3 * 3, 128), nn.ReLU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):
        return self.body(x)             # [B, 128]

    def forward(self, x):
        return self.head(self.body(x))  # [B, 10] logits


@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """Class probabilities [N, 10] and penultimate features [N, 128] of images in [−1, 1]."""
    classifier.eval()
    features = torch.cat([classifier.features(images[i:i + batch_size])
                          for i in range(0, len(images), batch_size)])
    return classifier.head(features).softmax(dim=1), features


def train_classifier(data_dir, device, epochs=2, batch_size=128):
    """The judge: two epochs of Adam with a one-cycle schedule (about a minute on 2 cores)."""
    images, labels = load_mnist(data_dir, train=True, device=device)
    torch.manual_seed(0)
    classifier = Classifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    steps = epochs * (len(images) // batch_size)
    lr_decay = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    classifier.train()
    for _ in range(steps):
        batch = torch.randint(0, len(images), (batch_size,), device=device)
        loss = F.cross_entropy(classifier(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_decay.step()
    return classifier


def get_classifier(path, data_dir, device):
    """The classifier cached at `path`, or a new one, trained, tested and cached there."""
    classifier = Classifier().to(device)
    if os.path.isfile(path):
        try:
            classifier.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return classifier
        except Exception:  # a damaged cache is only a cache: train a new one
            print(f"could not read the cached classifier {path}; training a new one", flush=True)
    classifier = train_classifier(data_dir, device)
    test_images, test_labels = load_mnist(data_dir, train=False, device=device)
    accuracy = (classify(classifier, test_images)[0].argmax(1) == test_labels).float().mean()
    print(f"classifier trained: {accuracy.item():.2%} on the 10,000 MNIST test images", flush=True)
    try:
        durable_save(classifier.state_dict(), path)
    except OSError as error:  # a cache we cannot write costs a minute next time, nothing more
        print(f"could not cache the classifier at {path} ({error.strerror})", flush=True)
    return classifier


def frechet_distance(features_a, features_b):
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2·(Σ_a^½ Σ_b Σ_a^½)^½), in float64."""
    a, b = features_a.double().cpu(), features_b.double().cpu()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_eigenvalues = torch.diag(eigenvalues.clamp(min=0).sqrt())
    sqrt_cov_a = eigenvectors @ sqrt_eigenvalues @ eigenvectors.T                  # Σ_a^½
    middle = torch.linalg.eigvalsh(sqrt_cov_a @ cov_b @ sqrt_cov_a).clamp(min=0)   # eigenvalues
    trace_term = cov_a.trace() + cov_b.trace() - 2 * middle.sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + trace_term).item()


def draw_in_batches(model, scheduler, config, labels, count, batch_size, **sampling):
    """`count` samples, `batch_size` at a time, one generator throughout."""
    chunks = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        chunk_labels = None if labels is None else labels[start:start + size]
        chunks.append(generate(model, scheduler, config, chunk_labels, shape=(size, 1, 28, 28),
                               **sampling))
    return torch.cat(chunks)


def judge_samples(classifier, samples, labels, test_features):
    """One row of the evaluation table: accuracy and worst digit (conditional) or the share of
    confident samples and each digit's share (unconditional), and the Fréchet distance."""
    probabilities, features = classify(classifier, samples.clamp(-1, 1))
    predicted = probabilities.argmax(dim=1)
    row = {"distance": frechet_distance(features, test_features)}
    if labels is not None:
        per_digit = torch.stack([(predicted[labels == d] == d).float().mean()
                                 for d in range(NUM_CLASSES)])
        worst = per_digit.argmin().item()
        row.update(accuracy=per_digit.mean().item(), worst=f"{worst}: {per_digit[worst]:.0%}")
    else:
        row["confident"] = (probabilities.max(dim=1).values >= 0.9).float().mean().item()
        row["shares"] = (torch.bincount(predicted.cpu(), minlength=NUM_CLASSES) / len(samples))
    return row


def print_row(sampler, steps, guidance_scale, row, seconds):
    if "accuracy" in row:
        print(f"{sampler:>10} {steps:>5} {guidance_scale:>5g} {row['accuracy']:>9.1%} "
              f"{row['worst']:>12} {row['distance']:>9.2f} {seconds:>8.3f}", flush=True)
    else:
        shares = " ".join(f"{share:.0%}" for share in row["shares"].tolist())
        print(f"{sampler:>10} {steps:>5} {guidance_scale:>5g} {row['distance']:>9.2f} "
              f"{row['confident']:>10.1%} {seconds:>8.3f}  {shares}", flush=True)


def print_header(cond):
    if cond:
        print(f"{'sampler':>10} {'steps':>5} {'w':>5} {'accuracy':>9} {'worst digit':>12} "
              f"{'distance':>9} {'s/image':>8}")
    else:
        print(f"{'sampler':>10} {'steps':>5} {'w':>5} {'distance':>9} {'confident':>10} "
              f"{'s/image':>8}  share of each predicted digit 0-9")


def evaluate(model, scheduler, config, classifier, data_dir, *, settings, guidance_scales,
             per_label, batch_size, seed, guidance_interval=None, guide=None):
    """For each (sampler, steps) and each w: draw per_label samples of every digit, judge them."""
    device = next(model.parameters()).device
    test_features = classify(classifier, load_mnist(data_dir, train=False, device=device)[0])[1]
    train_images = load_mnist(data_dir, train=True, device=device)[0]
    count = per_label * NUM_CLASSES
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    floor = frechet_distance(classify(classifier, train_images[pick[:count]])[1], test_features)
    print(f"Fréchet distance of {count} real training images to the test set "
          f"(the floor): {floor:.2f}")
    labels = None
    if config.cond:  # per_label of each digit, in order
        labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_label)
    print_header(config.cond)
    for sampler, steps in settings:
        for guidance_scale in guidance_scales:
            started = time.time()
            samples = draw_in_batches(model, scheduler, config, labels, count, batch_size,
                                      guidance_scale=guidance_scale, sampler=sampler,
                                      steps=steps, guidance_interval=guidance_interval,
                                      guide=guide,
                                      generator=torch.Generator().manual_seed(seed))
            seconds = (time.time() - started) / count
            row = judge_samples(classifier, samples, labels, test_features)
            print_row(sampler, steps, guidance_scale, row, seconds)


# ---------------------------------------------------------------------------------------------
# 11. Command line
#     train / sample / evaluate. Every flag is listed explicitly; every input is checked before
#     any work starts; a mistake gets one line on stderr and a non-zero exit, never a traceback.
# ---------------------------------------------------------------------------------------------

def digit(text):
    if not text.lstrip("-").isdigit() or not 0 <= int(text) < NUM_CLASSES:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9, got {text!r}")
    return int(text)


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def nonnegative_int(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number ≥ 0, got {text!r}")
    return int(text)


def number_in(low, high, low_open=False, high_open=False):
    """An argparse type: a finite float in the interval [low, high] (either end open)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = math.isfinite(value) and (low < value if low_open else low <= value)
        inside = inside and (value < high if high_open else value <= high)
        if not inside:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value
    return parse


def interval(text):
    """"LO,HI" with 0 ≤ LO ≤ HI ≤ 1: the part of t/(T−1) where guidance applies."""
    try:
        low, high = (float(value) for value in text.split(","))
    except ValueError:
        low, high = math.nan, math.nan
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"must be two numbers LO,HI with 0 ≤ LO ≤ HI ≤ 1, "
                                         f"got {text!r}")
    return low, high


def finite_numbers(text):
    """Comma-separated finite floats: guidance scales."""
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(value) for value in values):
        raise argparse.ArgumentTypeError(f"must be a finite number or comma-separated finite "
                                         f"numbers, got {text!r}")
    return values


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (not the whole usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common_flags(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run (default: auto)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--data-dir", default="data",
                        help="folder with MNIST/raw; downloaded there if missing (default: data)")


def add_train_flags(parser, defaults=Config()):
    add = parser.add_argument
    add("--cond", action="store_true",
        help="conditional model: cross-attention to the label, label dropout for CFG")
    add("--objective", choices=["eps", "flow"], default=defaults.objective,
        help="eps: DDPM noise prediction; flow: rectified-flow velocity (default: eps)")
    add("--prediction", choices=["eps", "v"], default=defaults.prediction,
        help="what the network outputs for eps: ε or v = √ᾱ·ε − √(1−ᾱ)·x0 (default: v)")
    add("--epochs", type=positive_int, default=defaults.epochs, help="passes over the data")
    add("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    add("--batch-size", type=positive_int, default=defaults.batch_size, help="images per step")
    add("--lr", type=number_in(0, 1, low_open=True), default=defaults.lr,
        help="peak learning rate, in (0, 1]")
    add("--label-drop", type=number_in(0, 1, high_open=True), default=defaults.label_drop,
        help="probability of replacing a label with ∅, in [0, 1)")
    add("--warmup-steps", type=nonnegative_int, default=defaults.warmup_steps)
    add("--ema-decay", type=number_in(0, 1, high_open=True), default=defaults.ema_decay,
        help=f"largest EMA decay d, in [0, 1) (default: {defaults.ema_decay:g})")
    add("--min-snr-gamma", type=number_in(0, 1e6), default=defaults.min_snr_gamma,
        help="γ of the min-SNR loss weight; 0 switches it off")
    add("--t-sampling", choices=["uniform", "logsnr"], default=defaults.t_sampling,
        help="how training draws t: uniform, or log SNR(t) ~ N(mean, std²) (default: logsnr)")
    add("--logsnr-mean", type=number_in(-20, 20), default=defaults.logsnr_mean,
        help=f"mean of log SNR for --t-sampling logsnr (default: {defaults.logsnr_mean:g})")
    add("--logsnr-std", type=number_in(0, 20, low_open=True), default=defaults.logsnr_std,
        help=f"its standard deviation, > 0 (default: {defaults.logsnr_std:g})")
    add("--out-dir", default="runs", help="where the checkpoint and sample grids go")
    add("--resume", action="store_true", help="continue the run in <out-dir>/ckpt.pt")
    add("--overwrite", action="store_true",
        help="start a new run even though <out-dir>/ckpt.pt holds one")
    add_model_flags(parser, defaults)


def add_model_flags(parser, defaults=Config()):
    add = parser.add_argument
    add("--patch-size", type=positive_int, default=defaults.patch_size, help="must divide 28")
    add("--width", type=positive_int, default=defaults.width,
        help="token width D; divisible by 4 and by the head count")
    add("--depth", type=positive_int, default=defaults.depth, help="transformer blocks")
    add("--heads", type=positive_int, default=defaults.heads, help="attention heads")
    add("--conv-channels", type=nonnegative_int, default=defaults.conv_channels,
        help="channels of the conv stem and head; 0: plain linear patches")


def add_sample_flags(parser, defaults=Config()):
    add = parser.add_argument
    add("--ckpt", default="runs/ckpt.pt", help="checkpoint from `train` (default: runs/ckpt.pt)")
    add("--label", type=digit, default=None,
        help="digit to draw; without it a conditional model draws one row per digit")
    add("--negative-label", type=digit, default=None,
        help="digit to steer away from (it fills the unconditional branch)")
    add("--n", type=positive_int, default=16,
        help="number of images (per digit without --label) (default: 16)")
    add("--guidance-scale", type=finite_numbers, default=None,
        help=f"w in ε_∅ + w·(ε_c − ε_∅); several, comma-separated, draw a row each "
             f"(default: the checkpoint's, {defaults.guidance_scale:g})")
    add("--guidance-interval", type=interval, default=None,
        help="LO,HI: guide only where t/(T−1) lies in [LO, HI] (default: the checkpoint's)")
    add("--sampler", choices=["ddim", "dpm", "ddpm", "euler"], default=None,
        help="ddim, dpm (DPM-Solver++(2M)), ddpm (all T steps), euler (flow models) "
             "(default: the checkpoint's)")
    add("--steps", type=positive_int, default=None,
        help="steps of dpm / ddim / euler (default: the checkpoint's, 10 for dpm)")
    add("--init-image", default=None, help="image-to-image: start from this picture")
    add("--strength", type=number_in(0, 1, low_open=True), default=0.6,
        help="image-to-image: how far to noise the picture, in (0, 1] (default: 0.6)")
    add("--output", default="samples.png", help="picture to write (default: samples.png)")
    add("--gif", default=None, help="also write the denoising as an animated GIF here")


def add_evaluate_flags(parser):
    add = parser.add_argument
    add("--ckpt", default="runs/ckpt.pt", help="checkpoint to evaluate (default: runs/ckpt.pt)")
    add("--guidance-scales", type=finite_numbers, default=None,
        help="comma-separated w values (default: 0,1,2,3,5 for a conditional model; 1 and "
             "the checkpoint's for an unconditional one with a guide)")
    add("--guidance-interval", type=interval, default=None,
        help="LO,HI: guide only where t/(T−1) lies in [LO, HI] (default: the checkpoint's)")
    add("--samplers", default=None,
        help="comma-separated sampler:steps, e.g. ddim:20,ddpm (default: the checkpoint's)")
    add("--per-label", type=positive_int, default=100, help="samples of each digit (default: 100)")
    add("--batch-size", type=positive_int, default=500, help="images drawn at once (default: 500)")


def build_parser():
    parser = Parser(description="Diffusion on MNIST in one file: a DDPM/DDIM scheduler, a DiT "
                                "with cross-attention, classifier-free guidance.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    add_common_flags(common)
    add_train_flags(commands.add_parser(
        "train", parents=[common], help="train a model on MNIST",
        description="Train a DiT on MNIST; writes <out-dir>/ckpt.pt and a grid each epoch."))
    add_sample_flags(commands.add_parser(
        "sample", parents=[common], help="draw images from a checkpoint",
        description="Draw a grid; CFG with --guidance-scale, img2img with --init-image."))
    add_evaluate_flags(commands.add_parser(
        "evaluate", parents=[common], help="measure sample quality with a classifier",
        description="Label accuracy and Fréchet distance of samples, judged by a small CNN."))
    return parser


# Checks that run before any work -------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; "
                        "use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for, but this machine or PyTorch build has no "
                        "MPS; use --device cpu or auto")
    return name


def check_model_shape(config):
    """The DiT's shape rules, said in the user's terms."""
    if config.image_size % config.patch_size:
        raise UserError(f"--patch-size {config.patch_size} does not divide the "
                        f"{config.image_size}-pixel image; use 1, 2, 4, 7, 14 or 28")
    if config.width % 4:
        raise UserError(f"--width {config.width} must be divisible by 4 (the 2-D position "
                        f"embedding gives a quarter of the channels to each sine and cosine)")
    if config.width % config.heads:
        raise UserError(f"--width {config.width} must be divisible by --heads {config.heads}")


def check_writable_folder(folder, flag):
    """Create the folder if needed and prove a file can be written there."""
    try:
        os.makedirs(folder or ".", exist_ok=True)
        with tempfile.TemporaryFile(dir=folder or "."):
            pass
    except OSError as error:
        raise UserError(f"{flag}: cannot write into {folder} ({error.strerror or error})") from None


def check_picture_path(path, flag, extensions):
    if os.path.splitext(path)[1].lower() not in extensions:
        raise UserError(f"{flag} {path}: the name must end in one of {', '.join(extensions)}")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; give a file name")
    check_writable_folder(os.path.dirname(path), flag)


def image_extensions():
    from PIL import Image
    Image.init()
    return sorted(ext for ext, fmt in Image.registered_extensions().items()
                  if fmt in Image.SAVE)


def check_sampler(sampler, steps, config):
    """Which sampler fits which checkpoint, and how many steps it may take."""
    flow = config.objective == "flow"
    if sampler not in ("ddim", "dpm", "ddpm", "euler"):
        raise UserError(f"unknown sampler {sampler!r}; choose ddim, dpm, ddpm or euler")
    if flow and sampler != "euler":
        raise UserError(f"this checkpoint was trained with --objective flow; it samples with "
                        f"--sampler euler, not {sampler}")
    if not flow and sampler == "euler":
        raise UserError("--sampler euler needs a checkpoint trained with --objective flow; "
                        "use ddim or ddpm")
    if steps < 1 or (not flow and steps > config.num_timesteps):
        raise UserError(f"--steps must be between 1 and T = {config.num_timesteps}, got {steps}")
    if sampler == "ddpm" and steps != config.num_timesteps:
        raise UserError(f"the DDPM sampler takes all T = {config.num_timesteps} steps; use "
                        f"--sampler ddim for fewer")


# The three commands -------------------------------------------------------------------------

def config_from_flags(args):
    defaults = Config()
    if args.objective == "flow":  # a flow model samples with Euler steps
        defaults = replace(defaults, sampler="euler", sample_steps=20)
    return replace(defaults, cond=args.cond, objective=args.objective,
                   prediction=args.prediction, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, label_drop=args.label_drop, warmup_steps=args.warmup_steps,
                   ema_decay=args.ema_decay, min_snr_gamma=args.min_snr_gamma,
                   t_sampling=args.t_sampling,
                   logsnr_mean=args.logsnr_mean, logsnr_std=args.logsnr_std,
                   patch_size=args.patch_size,
                   width=args.width, depth=args.depth, heads=args.heads,
                   conv_channels=args.conv_channels)


def prepare_training(args, device, ckpt_path):
    """The config (the saved run's when resuming), the checkpoint to resume, and the seed."""
    if args.resume:
        checkpoint, config = load_checkpoint(ckpt_path, device)
        if "generator" not in checkpoint:
            print(f"{ckpt_path} predates exact resume: its random state starts afresh", flush=True)
            checkpoint["generator"] = torch.Generator().manual_seed(args.seed).get_state()
        return config, checkpoint, checkpoint.get("seed", args.seed)
    if os.path.exists(ckpt_path) and not args.overwrite:
        raise UserError(f"{ckpt_path} already holds a run; continue it with --resume, start "
                        f"over with --overwrite, or choose another --out-dir")
    return config_from_flags(args), None, args.seed


def command_train(args):
    device = pick_device(args.device)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    config, checkpoint, seed = prepare_training(args, device, ckpt_path)
    check_model_shape(config)
    images, labels = load_mnist(args.data_dir, train=True, device=device)
    if config.batch_size > len(images):
        raise UserError(f"--batch-size {config.batch_size} is larger than the "
                        f"{len(images)} training images")
    check_writable_folder(args.out_dir, "--out-dir")
    total_steps = args.max_steps or config.epochs * (len(images) // config.batch_size)
    kind = "conditional" if config.cond else "unconditional"
    print(f"{kind} DiT, {count_parameters(DiT(config)) / 1e6:.2f} M parameters, objective "
          f"{config.objective}, {len(images)} images, {total_steps} steps of {config.batch_size} "
          f"on {device}", flush=True)
    started = time.time()
    run = train(config, images, labels, out_dir=args.out_dir, total_steps=total_steps,
                seed=seed, checkpoint=checkpoint)
    if run.step < total_steps:
        print(f"\ninterrupted at step {run.step}; saved {ckpt_path} (continue with --resume)")
        raise SystemExit(130)
    hint = " --label 4" if config.cond else ""
    print(f"done in {format_seconds(time.time() - started)}; sample with "
          f"`python vanilla_diffusion.py sample --ckpt {ckpt_path}{hint}`", flush=True)


def sample_labels(args, config, device):
    """The labels to draw and the grid's row length."""
    if not config.cond:
        return None, math.ceil(math.sqrt(args.n))
    if args.label is None:  # a conditional model with no --label: one row per digit
        return torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.n), args.n
    return torch.full((args.n,), args.label, device=device), math.ceil(math.sqrt(args.n))


def check_sample_flags(args, config, sampler, steps):
    if args.label is not None and not config.cond:
        raise UserError(f"{args.ckpt} is an unconditional model; drop --label "
                        f"(or train one with `train --cond`)")
    if args.negative_label is not None and (not config.cond or args.label is None):
        raise UserError("--negative-label needs a conditional checkpoint and a --label")
    if args.guidance_scale and len(args.guidance_scale) > 1 and config.cond and args.label is None:
        raise UserError("several --guidance-scale values draw one row per scale; "
                        "give a --label too")
    check_sampler(sampler, steps, config)
    check_picture_path(args.output, "--output", image_extensions())
    if args.gif:
        check_picture_path(args.gif, "--gif", [".gif"])


def command_sample(args):
    device = pick_device(args.device)
    model, scheduler, config, state = load_model(args.ckpt, device)
    guide = None if config.cond else load_guide(state, config, device)
    sampler = args.sampler or default_sampler(config)
    steps = args.steps or default_steps(sampler, config)
    check_sample_flags(args, config, sampler, steps)
    labels, nrow = sample_labels(args, config, device)
    count = args.n if labels is None else len(labels)
    negative = None if args.negative_label is None else torch.full_like(labels, args.negative_label)
    init, strength = None, 1.0  # strength 1: start from pure noise
    if args.init_image:
        init = load_init_image(args.init_image, config.image_size).to(device)
        init, strength = init.expand(count, -1, -1, -1), args.strength
    scales = args.guidance_scale or [default_guidance_scale(config)]
    rows, frames = [], []
    for guidance_scale in scales:  # one seed for every scale: each column starts from one noise
        frames.append([] if args.gif else None)
        rows.append(generate(model, scheduler, config, labels, shape=(count, 1, 28, 28),
                             guidance_scale=guidance_scale, sampler=sampler, steps=steps,
                             negative_labels=negative, init_images=init, strength=strength,
                             guidance_interval=args.guidance_interval, guide=guide,
                             generator=torch.Generator().manual_seed(args.seed),
                             frames=frames[-1]))
    nrow = nrow if len(scales) == 1 else args.n
    save_grid(torch.cat(rows), args.output, nrow=nrow)
    print(f"wrote {args.output} ({count * len(scales)} images, {sampler} with {steps} steps)")
    if args.gif:
        save_animation([torch.cat(step) for step in zip(*frames)], args.gif, nrow)
        print(f"wrote {args.gif}")


def parse_sampler_settings(text, config):
    """"ddim:20,ddpm" → [("ddim", 20), ("ddpm", T)], each checked against the checkpoint."""
    settings = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition(":")
        if steps and not steps.isdigit():
            raise UserError(f"--samplers takes sampler:steps items such as ddim:20,ddpm; "
                            f"got {item!r}")
        steps = int(steps) if steps else default_steps(name, config)
        check_sampler(name, steps, config)
        settings.append((name, steps))
    return settings


def command_evaluate(args):
    device = pick_device(args.device)
    model, scheduler, config, state = load_model(args.ckpt, device)
    default = f"{default_sampler(config)}:{config.sample_steps}"
    settings = parse_sampler_settings(args.samplers or default, config)
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    classifier = get_classifier(os.path.join(folder, "mnist_classifier.pt"), args.data_dir, device)
    guidance_interval = args.guidance_interval or (config.guidance_low, config.guidance_high)
    guide = None if config.cond else load_guide(state, config, device)
    scales = args.guidance_scales or [0.0, 1.0, 2.0, 3.0, 5.0]
    if not config.cond:  # w = 1: the model alone; then autoguidance, if there is a guide
        scales = args.guidance_scales or [1.0] + ([config.autoguidance_scale] if guide else [])
    print(f"checkpoint {args.ckpt}: step {state['step']}, objective {config.objective}; "
          f"{args.per_label * NUM_CLASSES} samples per setting; guidance where t/(T−1) ∈ "
          f"[{guidance_interval[0]:g}, {guidance_interval[1]:g}]")
    evaluate(model, scheduler, config, classifier, args.data_dir, settings=settings,
             guidance_scales=scales, per_label=args.per_label, batch_size=args.batch_size,
             seed=args.seed, guidance_interval=guidance_interval, guide=guide)


def main(argv=None):
    args = build_parser().parse_args(argv)
    commands = {"train": command_train, "sample": command_sample, "evaluate": command_evaluate}
    try:
        commands[args.command](args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
    except (torch.OutOfMemoryError, MemoryError):
        print("error: out of memory; try a smaller --batch-size (or --n)", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
