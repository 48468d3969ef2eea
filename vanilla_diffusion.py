"""VanillaDiffusion: diffusion on MNIST in one file, read top to bottom.

Contents, in the order the idea unfolds:
    1. Config             every default in one place
    2. Noise scheduler    DDPM forward (noise_image) and reverse (sample_prev_image_distribution), DDIM, rectified flow
    3. Model              a patchify DiT: self-attention over image tokens, cross-attention to condition tokens
    4. Data               MNIST as one tensor in [-1, 1]
    5. Training           Algorithm 1 of Ho et al. 2020, with label dropout for classifier-free guidance
    6. Sampling           classifier-free guidance, negative labels, image-to-image
    7. Evaluation         a small classifier judges the samples: label accuracy and a Fréchet distance
    8. Command line       train / sample / evaluate

Symbols used in the comments (paper → code):
    T                  → config.num_timesteps        t ∈ {0, …, T−1}, 0-based, indexes the tables below
    β_t                → scheduler.betas
    α_t = 1 − β_t      → scheduler.alphas
    ᾱ_t = ∏_{s≤t} α_s  → scheduler.alpha_bar
    ε, ε_θ(x_t, t, c)  → noise, pred_noise
    w                  → guidance_scale
    η                  → eta (DDIM)
    ∅                  → NULL_LABEL, the "no label" row of the label embedding
"""

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

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
    image_size: int = 28                # MNIST is 28×28, one grey channel
    # noise schedule (DDPM, Ho et al. 2020)
    num_timesteps: int = 1000           # T
    beta_start: float = 1e-4            # β_0, linear schedule as in the DDPM paper
    beta_end: float = 0.02              # β_{T−1}
    objective: str = "eps"              # "eps": DDPM noise schedule (seed 000); "flow": rectified flow (seed 003)
    prediction: str = "v"               # DDPM only. "eps": the network outputs ε_θ; "v": it outputs v, converted to ε_θ
    # model (DiT, Peebles & Xie 2023)
    cond: bool = False                  # `train --cond`: cross-attention to a label; otherwise unconditional (seed part A)
    patch_size: int = 4                 # 4 → 7×7 = 49 tokens; 2 → 196 tokens, 3–5× slower on a CPU
    width: int = 128                    # D, token width
    depth: int = 6                      # number of transformer blocks
    heads: int = 4                      # attention heads, D / heads = 32 channels each
    mlp_ratio: int = 4                  # MLP hidden width = mlp_ratio · D
    conv_channels: int = 16             # 3×3 conv stem before patchify and conv head after it (0: plain linear patches)
    label_tokens: int = 4               # condition tokens per label; with the timestep token, 5 keys for cross-attention
    # training
    batch_size: int = 32                # images per step: small batches, many steps (4× the steps of 128 at ~95% of the speed)
    lr: float = 1e-3                    # peak learning rate of AdamW
    warmup_steps: int = 200             # linear warm-up, then cosine decay to 0
    epochs: int = 2                     # passes over the 60,000 training images (about 11 minutes on 2 CPU cores)
    label_drop: float = 0.1             # CFG needs the unconditional task too: p(label → ∅)
    ema_decay: float = 0.999            # weights used for sampling: θ_ema ← d·θ_ema + (1 − d)·θ
    min_snr_gamma: float = 5.0          # loss weight min(SNR, γ)/SNR for ε, /(SNR + 1) for v (Hang et al. 2023); 0: off
    # sampling
    guidance_scale: float = 2.0         # w in ε = ε_∅ + w·(ε_c − ε_∅); 2 measured best (README: results)
    sampler: str = "ddim"               # "ddim" (few steps) or "ddpm" (all T steps); flow models use "euler"
    sample_steps: int = 20              # DDIM / Euler steps
    clip_x0: bool = True                # clamp the predicted x0 to [−1, 1] at each step (seed 001)


# ---------------------------------------------------------------------------------------------
# 2. Noise scheduler
#    Forward: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε.  Reverse: one DDPM step, one DDIM step (seed 000, 001, 003).
# ---------------------------------------------------------------------------------------------

def per_sample(table, t, x):
    """Look up table[t] for an int or a [B] tensor t, shaped to broadcast against x [B, C, H, W]."""
    t = torch.as_tensor(t, device=table.device)
    return table[t].reshape(-1, *([1] * (x.dim() - 1)))  # [B, 1, 1, 1] (or [1, 1, 1, 1] for an int)


def gaussian_like(x, generator=None):
    """z ~ N(0, I) shaped like x, drawn on the generator's device so a seed gives the same images on any device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class NoiseScheduler(nn.Module):
    """The DDPM noise schedule and the steps that use it. A module only so that .to(device) moves the tables."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
        super().__init__()
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)  # β_t, linear
        alphas = 1.0 - betas                                                                # α_t = 1 − β_t
        alpha_bar = torch.cumprod(alphas, dim=0)                                            # ᾱ_t = ∏_{s≤t} α_s
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])    # ᾱ_{t−1}, ᾱ_{−1} = 1
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),                                     # √ᾱ_t
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),                     # √(1−ᾱ_t)
            "posterior_variance": betas * (1 - alpha_bar_prev) / (1 - alpha_bar),   # β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t
            "snr": alpha_bar / (1 - alpha_bar),                                     # SNR(t) = ᾱ_t / (1−ᾱ_t)
            "posterior_mean_coef_x0": alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
            "posterior_mean_coef_xt": alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
        }
        for name, table in tables.items():  # computed in float64, stored in float32
            self.register_buffer(name, table.float(), persistent=False)
        self.num_timesteps = num_timesteps

    def noise_image(self, x0, t, noise=None):
        """Forward process q(x_t | x0) in one jump: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, ε ~ N(0, I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = per_sample(self.sqrt_alpha_bar, t, x0) * x0 + per_sample(self.sqrt_one_minus_alpha_bar, t, x0) * noise
        return x_t, noise

    def velocity(self, x0, t, noise):
        """The v-prediction target (Salimans & Ho 2022): v = √ᾱ_t·ε − √(1−ᾱ_t)·x0; at high noise v ≈ −x0."""
        return per_sample(self.sqrt_alpha_bar, t, x0) * noise - per_sample(self.sqrt_one_minus_alpha_bar, t, x0) * x0

    def noise_from_velocity(self, x_t, t, pred_velocity):
        """ε_θ = √ᾱ_t·v_θ + √(1−ᾱ_t)·x_t: a v-predicting network feeds the same ε formulas as an ε-predicting one."""
        return per_sample(self.sqrt_alpha_bar, t, x_t) * pred_velocity + per_sample(self.sqrt_one_minus_alpha_bar, t, x_t) * x_t

    def predict_x0(self, x_t, t, pred_noise):
        """Invert the forward process: x0 = (x_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t."""
        return (x_t - per_sample(self.sqrt_one_minus_alpha_bar, t, x_t) * pred_noise) / per_sample(self.sqrt_alpha_bar, t, x_t)

    def sample_prev_image_distribution(self, x_t, t, pred_noise, generator=None, posterior_variance=False, clip_x0=False):
        """One reverse step x_t → x_{t−1} ~ p_θ(x_{t−1} | x_t): Algorithm 2 (sampling) of Ho et al. 2020."""
        beta = per_sample(self.betas, t, x_t)
        # 1. the mean μ_θ(x_t, t)
        if clip_x0:
            # 1a. through the predicted x0, clamped to the data range (seed 001):
            #     μ = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t   (eq. 7 of Ho et al.)
            x0 = self.predict_x0(x_t, t, pred_noise).clamp(-1, 1)
            mean = per_sample(self.posterior_mean_coef_x0, t, x_t) * x0 + per_sample(self.posterior_mean_coef_xt, t, x_t) * x_t
        else:
            # 1b. directly: μ = 1/√α_t · (x_t − (1−α_t)/√(1−ᾱ_t) · ε_θ)   (eq. 11 of Ho et al.)
            mean = (x_t - beta / per_sample(self.sqrt_one_minus_alpha_bar, t, x_t) * pred_noise) / per_sample(self.alphas, t, x_t).sqrt()
        # 2. the standard deviation: σ_t² = β_t (default) or the posterior variance β̃_t
        variance = per_sample(self.posterior_variance if posterior_variance else self.betas, t, x_t)
        # 3. x_{t−1} = μ + σ_t·z, with z = 0 at t = 0 (the last step adds no noise)
        z = gaussian_like(x_t, generator)
        not_last = (torch.as_tensor(t, device=x_t.device) > 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + not_last * variance.sqrt() * z

    def ddim_step(self, x_t, t, t_prev, pred_noise, eta=0.0, generator=None, clip_x0=False):
        """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12); t_prev = −1 means "to x0".

        η = 0 is deterministic; η = 1 matches DDPM's σ_t² = β̃_t when t_prev = t − 1.
        """
        alpha_bar = per_sample(self.alpha_bar, t, x_t)
        alpha_bar_prev = per_sample(self.alpha_bar, t_prev, x_t) if t_prev >= 0 else torch.ones_like(alpha_bar)
        # 1. predicted x0 = (x_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t, optionally clamped; then the ε that matches it
        x0 = self.predict_x0(x_t, t, pred_noise)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            pred_noise = (x_t - alpha_bar.sqrt() * x0) / per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
        # 2. σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt() * (1 - alpha_bar / alpha_bar_prev).sqrt()
        # 3. x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−σ²)·ε_θ + σ·z
        z = gaussian_like(x_t, generator) if eta > 0 else 0.0
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * pred_noise + sigma * z


# Rectified flow (seed 003): a straight line from data (s = 0) to noise (s = 1), s ∈ [0, 1].

def flow_interpolate(x0, s, noise):
    """x_s = (1 − s)·x0 + s·ε; the velocity along the line is v = dx_s/ds = ε − x0."""
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return (1 - s) * x0 + s * noise


def euler_step(x_s, s, s_next, velocity):
    """One Euler step of dx/ds = v from s to s_next (< s): x_{s_next} = x_s + (s_next − s)·v."""
    return x_s + (s_next - s) * velocity


# ---------------------------------------------------------------------------------------------
# 3. Model: a DiT noise predictor (Peebles & Xie 2023) with cross-attention to the label (seed 000)
#    Image patches become tokens; the timestep enters every block through adaLN-Zero.
# ---------------------------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] → [B, dim] (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # [dim/2]
    angles = t.float()[:, None] * freqs[None]                                                                # [B, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)                                         # [B, dim]


def position_embedding_2d(grid, dim):
    """Fixed 2-D sine-cosine position embedding (as in DiT/MAE): half the channels for rows, half for columns."""
    axis = timestep_embedding(torch.arange(grid, dtype=torch.float32), dim // 2)                         # [grid, D/2]
    rows, cols = axis[:, None].expand(grid, grid, -1), axis[None].expand(grid, grid, -1)                  # [grid, grid, D/2]
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)                                       # [N, D]


def patchify(images, patch_size):
    """[B, C, H, W] → [B, N, C·p·p], N = (H/p)·(W/p), patches in row-major order."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)          # [B, C, h, p, w, p]
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, patch_size, channels=1):
    """[B, N, C·p·p] → [B, C, H, W], the inverse of patchify for a square image."""
    B, N, _ = tokens.shape
    p, grid = patch_size, math.isqrt(N)
    x = tokens.reshape(B, grid, grid, channels, p, p)       # [B, h, w, C, p, p]
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, grid * p, grid * p)


def modulate(x, shift, scale):
    """adaLN: x·(1 + scale) + shift, with shift and scale computed from the timestep."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention softmax(QKᵀ/√d)·V. Self-attention when context is x; cross-attention otherwise."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def split_heads(self, x):
        B, L, D = x.shape
        return x.reshape(B, L, self.heads, D // self.heads).transpose(1, 2)      # [B, heads, L, D/heads]

    def project(self, x, context):
        q = self.split_heads(self.to_q(x))                                       # [B, h, N, d]  queries: image tokens
        k, v = map(self.split_heads, self.to_kv(context).chunk(2, dim=-1))       # [B, h, M, d]  keys, values: context
        return q, k, v

    def forward(self, x, context):
        y = F.scaled_dot_product_attention(*self.project(x, context))            # [B, h, N, d]
        return self.out(y.transpose(1, 2).flatten(2))                            # [B, N, D]

    def attention_weights(self, x, context):
        """softmax(QKᵀ/√d), [B, heads, N, M]: what forward() computes inside SDPA, written out (for tests)."""
        q, k, _ = self.project(x, context)
        return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


class DiTBlock(nn.Module):
    """LayerNorm → self-attention → residual; LayerNorm → cross-attention → residual; LayerNorm → MLP → residual.

    adaLN-Zero: the timestep sets a shift, scale and gate for each of the sub-layers; the gates start at 0,
    so every block starts as the identity. The unconditional model has no cross-attention.
    """

    def __init__(self, dim, heads, mlp_ratio, cross_attention):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) if cross_attention else None
        self.cross_attn = Attention(dim, heads) if cross_attention else None
        self.norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * dim, dim))
        self.num_sublayers = 3 if cross_attention else 2
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * self.num_sublayers * dim))
        nn.init.zeros_(self.ada_ln[1].weight)  # adaLN-Zero: gates (and shifts, scales) start at 0
        nn.init.zeros_(self.ada_ln[1].bias)

    def forward(self, x, time_emb, cond_tokens=None):
        # x: [B, N, D] image tokens; time_emb: [B, D]; cond_tokens: [B, M, D]
        # (shift, scale, gate) per sub-layer, each [B, 1, D]; the cross-attention's three come last (absent if unconditional)
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp, *cross = self.ada_ln(time_emb)[:, None].chunk(3 * self.num_sublayers, dim=-1)
        h = modulate(self.norm_self(x), shift_sa, scale_sa)
        x = x + gate_sa * self.self_attn(h, h)                                     # [B, N, D]  image ↔ image
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = cross
            h = modulate(self.norm_cross(x), shift_ca, scale_ca)
            x = x + gate_ca * self.cross_attn(h, cond_tokens)                      # [B, N, D]  Q: image, K/V: condition
        h = modulate(self.norm_mlp(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)                                          # [B, N, D]


class DiT(nn.Module):
    """ε_θ(x_t, t, c): noisy image, timestep and label in, predicted noise (or velocity) out, same shape."""

    def __init__(self, config):
        super().__init__()
        D, p, C = config.width, config.patch_size, config.conv_channels
        self.config = config
        if C:  # local pixel features at full resolution, before and after the transformer (a U-Net-style skip)
            self.stem = nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.GELU(), nn.Conv2d(C, C, 3, padding=1))
            self.head = nn.Sequential(nn.Conv2d(2 * C, C, 3, padding=1), nn.GELU(), nn.Conv2d(C, 1, 3, padding=1))
        self.pixel_channels = C or 1
        self.patch_embed = nn.Linear(self.pixel_channels * p * p, D)               # a p×p patch → one token
        grid = config.image_size // p
        self.register_buffer("pos_embed", position_embedding_2d(grid, D)[None], persistent=False)  # [1, N, D]
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        if config.cond:
            # 11 rows: digits 0–9 and ∅; each row is `label_tokens` tokens for the cross-attention to look at
            # N(0, 1) rows: as large as the timestep token beside them, so the label is heard from the first step
            self.label_embed = nn.Embedding(NUM_CLASSES + 1, config.label_tokens * D)
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_ratio, config.cond) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, self.pixel_channels * p * p)
        last = self.head[-1] if C else self.final_linear
        for layer in (self.final_ada_ln[1], last):  # adaLN-Zero: the model starts by predicting 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_tokens(self, labels, time_emb):
        """The keys/values of the cross-attention: the label's tokens plus the timestep token, [B, M, D]."""
        B, D = time_emb.shape
        label_tokens = self.label_embed(labels).reshape(B, self.config.label_tokens, D)   # [B, L, D]
        return torch.cat([label_tokens, time_emb[:, None]], dim=1)                        # [B, L+1, D]

    def forward(self, x_t, t, labels=None):
        # x_t: [B, 1, 28, 28]; t: [B] timesteps in [0, T−1] (fractional for flow); labels: [B] in 0..10
        p = self.config.patch_size
        pixels = self.stem(x_t) if self.config.conv_channels else x_t            # [B, C, 28, 28]
        x = self.patch_embed(patchify(pixels, p)) + self.pos_embed               # [B, N, D], N = (28/p)²
        time_emb = self.time_mlp(timestep_embedding(t, x.shape[-1]))             # [B, D]
        cond = self.condition_tokens(labels, time_emb) if self.config.cond else None  # [B, M, D]
        for block in self.blocks:
            x = block(x, time_emb, cond)                                         # [B, N, D]
        shift, scale = self.final_ada_ln(time_emb)[:, None].chunk(2, dim=-1)     # [B, 1, D] each
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))        # [B, N, C·p·p]
        x = unpatchify(x, p, self.pixel_channels)                                # [B, C, 28, 28]
        if self.config.conv_channels:
            x = self.head(torch.cat([x, pixels], dim=1))                         # [B, 1, 28, 28]
        return x


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# 4. Data
#    MNIST as one tensor in [−1, 1] on the training device: batches are index lookups, no per-image work.
# ---------------------------------------------------------------------------------------------

class CliError(Exception):
    """A problem the user can fix; the command line prints it as one line and exits with status 1."""


def load_mnist(data_dir, train=True, device="cpu"):
    """Returns images [N, 1, 28, 28] in [−1, 1] and labels [N]; downloads into data_dir when the files are missing."""
    from torchvision.datasets import MNIST
    try:
        dataset = MNIST(root=data_dir, train=train, download=True)
    except Exception as error:  # no network, a proxy, a half-written file: say where we looked
        raise CliError(f"MNIST is not in {os.path.join(data_dir, 'MNIST', 'raw')} and could not be downloaded "
                       f"({type(error).__name__}: {error}); pass --data-dir pointing at a folder that holds MNIST/raw") from None
    images = dataset.data.to(device=device, dtype=torch.float32)[:, None] / 127.5 - 1  # [N, 1, 28, 28], x0 ∈ [−1, 1]
    return images, dataset.targets.to(device)


def to_pixels(x):
    """[−1, 1] → [0, 1] for saving: (x + 1) / 2, clamped; never min-max normalised (that hides range bugs)."""
    return ((x + 1) / 2).clamp(0, 1)


def save_grid(images, path, nrow):
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image(to_pixels(images.float().cpu()), path, nrow=nrow)


# ---------------------------------------------------------------------------------------------
# 5. Training: Algorithm 1 (training) of Ho et al. 2020, with label dropout for CFG (seed 000)
#    Sample x0, t, ε; build x_t with noise_image; regress the network onto ε (or onto v, which converts to ε).
# ---------------------------------------------------------------------------------------------

def drop_labels(labels, p, generator=None):
    """Classifier-free guidance training: each label becomes ∅ with probability p."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)


def training_loss(model, scheduler, x0, labels, config):
    """Per-sample loss [B] and the time of each sample in [0, 1) (for the per-t diagnostic)."""
    B = x0.shape[0]
    labels = drop_labels(labels, config.label_drop) if config.cond else None
    if config.objective == "flow":
        # rectified flow (seed 003): s ~ sigmoid(N(0, 1)) (logit-normal), x_s = (1−s)·x0 + s·ε, target v = ε − x0
        s = torch.sigmoid(torch.randn(B, device=x0.device))
        noise = torch.randn_like(x0)
        pred = model(flow_interpolate(x0, s, noise), s * (config.num_timesteps - 1), labels)
        return (pred - (noise - x0)).pow(2).mean(dim=(1, 2, 3)), s
    # DDPM: t ~ Uniform{0, …, T−1}, x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, loss ‖ε − ε_θ(x_t, t, c)‖² (or ‖v − v_θ‖²)
    t = torch.randint(0, config.num_timesteps, (B,), device=x0.device)
    x_t, noise = scheduler.noise_image(x0, t)
    target = noise if config.prediction == "eps" else scheduler.velocity(x0, t, noise)
    per_image = (model(x_t, t, labels) - target).pow(2).mean(dim=(1, 2, 3))     # [B]
    if config.min_snr_gamma > 0:  # min-SNR-γ (Hang et al. 2023): weight min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v
        snr = scheduler.snr[t]
        per_image = per_image * snr.clamp(max=config.min_snr_gamma) / (snr if config.prediction == "eps" else snr + 1)
    return per_image, t.float() / config.num_timesteps


def learning_rate(step, total_steps, config):
    """Linear warm-up to config.lr, then cosine decay to 0 at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)  # θ_ema ← d·θ_ema + (1 − d)·θ


def ema_decay_at(step, config):
    """EMA warm-up: early on the average follows the weights closely, later it settles to config.ema_decay."""
    return min(config.ema_decay, (1 + step) / (10 + step))


def save_checkpoint(path, model, ema, optimizer, config, step):
    """Write to a temporary file, then rename: a crash mid-write never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "config": asdict(config), "step": step}
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise CliError(f"no checkpoint at {path}; make one with `python vanilla_diffusion.py train --cond` "
                       f"(it writes runs/ckpt.pt) or pass --ckpt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        config = Config(**state["config"])
    except Exception as error:
        raise CliError(f"{path} is not a readable VanillaDiffusion checkpoint ({type(error).__name__}: {error})") from None
    return state, config


def build_model(config, device):
    return DiT(config).to(device), NoiseScheduler(config.num_timesteps, config.beta_start, config.beta_end).to(device)


def load_model(path, device):
    """The EMA weights of a checkpoint in a model rebuilt from its stored config, ready to sample."""
    state, config = load_checkpoint(path, device)
    model, scheduler = build_model(config, device)
    try:
        model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError) as error:
        raise CliError(f"the weights in {path} do not fit the model its config describes "
                       f"(made by another version of this file?): {str(error).splitlines()[0]}") from None
    return model.eval(), scheduler, config, state


def format_seconds(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def train(config, args):
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    start_step, state = 0, None
    if args.resume:
        state, saved = load_checkpoint(ckpt_path, device)
        config = saved  # the saved run's settings win: resuming continues that run
    images, labels = load_mnist(args.data_dir, train=True, device=device)
    model, scheduler = build_model(config, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as error:
            raise CliError(f"cannot resume from {ckpt_path}: {str(error).splitlines()[0]}") from None
        start_step = state["step"]
    steps_per_epoch = len(images) // config.batch_size
    total_steps = args.max_steps or config.epochs * steps_per_epoch
    kind = "conditional" if config.cond else "unconditional"
    print(f"{kind} DiT, {count_parameters(model) / 1e6:.2f} M parameters, objective {config.objective}, "
          f"{len(images)} images, {total_steps} steps of {config.batch_size} on {device}", flush=True)
    model.train()  # label dropout happens inside training_loss; nothing else differs between train and eval here
    bucket_loss, bucket_count = torch.zeros(10, device=device), torch.zeros(10, device=device)  # loss per tenth of t
    step, last_print, started, done_since_start = start_step, time.time(), time.time(), 0
    try:
        order, order_epoch = None, None
        while step < total_steps:
            epoch, index_in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:  # a fresh shuffle per epoch, seeded by the epoch so --resume continues it exactly
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed + epoch)).to(device)
                order_epoch = epoch
            batch = order[index_in_epoch * config.batch_size:(index_in_epoch + 1) * config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, config)
            per_image, time_fraction = training_loss(model, scheduler, images[batch], labels[batch], config)
            loss = per_image.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            update_ema(ema, model, ema_decay_at(step, config))
            step += 1
            done_since_start += 1
            buckets = (time_fraction * 10).long().clamp(0, 9)
            bucket_loss.index_add_(0, buckets, per_image.detach().float())
            bucket_count.index_add_(0, buckets, torch.ones_like(per_image))
            now = time.time()
            if now - last_print > 5 or step == total_steps:
                rate = done_since_start * config.batch_size / (now - started)
                eta = (total_steps - step) * config.batch_size / rate
                print(f"step {step}/{total_steps}  epoch {step / steps_per_epoch:.2f}  loss {loss.item():.4f}  "
                      f"lr {optimizer.param_groups[0]['lr']:.2e}  {rate:.0f} img/s  ETA {format_seconds(eta)}", flush=True)
                last_print = now
            if step % steps_per_epoch == 0 or step == total_steps:
                per_bucket = " ".join(f"{value:.3f}" for value in (bucket_loss / bucket_count.clamp(min=1)).tolist())
                print(f"loss per tenth of t (low noise → high noise): {per_bucket}", flush=True)
                bucket_loss.zero_(), bucket_count.zero_()
                save_checkpoint(ckpt_path, model, ema, optimizer, config, step)
                grid = os.path.join(args.out_dir, f"samples_step{step:06d}.png")
                save_sample_grid(ema, scheduler, config, grid, device)
                print(f"saved {ckpt_path} and {grid}", flush=True)
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, model, ema, optimizer, config, step)
        print(f"\ninterrupted at step {step}; saved {ckpt_path} (continue with --resume)", flush=True)
        raise SystemExit(130)
    print(f"done in {format_seconds(time.time() - started)}; sample with "
          f"`python vanilla_diffusion.py sample --ckpt {ckpt_path}" + (" --label 4`" if config.cond else "`"), flush=True)


# ---------------------------------------------------------------------------------------------
# 6. Sampling: classifier-free guidance (Ho & Salimans 2022), negative labels and image-to-image (seed 002)
#    ε = ε_∅ + w·(ε_c − ε_∅); the ∅ branch may hold a negative label; img2img starts from a noised image.
# ---------------------------------------------------------------------------------------------

def guided_prediction(model, x, t, labels, guidance_scale, negative_labels=None):
    """One batched forward pass of [cond; uncond], then ε = ε_uncond + w·(ε_cond − ε_uncond) on the whole output.

    w = 0 is the unconditional model, w = 1 the conditional one, w > 1 pushes further toward the label.
    With negative labels the "unconditional" branch is conditioned on them, so the sample is pushed away from them.
    """
    if labels is None:  # an unconditional model: nothing to guide
        return model(x, t, None)
    uncond_labels = torch.full_like(labels, NULL_LABEL) if negative_labels is None else negative_labels
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, uncond_labels]))  # [2B, 1, 28, 28]
    pred_cond, pred_uncond = both.chunk(2)                                                   # [B, 1, 28, 28] each
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def sampling_timesteps(start_t, steps):
    """`steps` integer timesteps from start_t down to 0, evenly spaced, no repeats: [start_t, …, 0]."""
    return torch.linspace(start_t, 0, steps).round().long().unique_consecutive().tolist()


@torch.no_grad()
def generate(model, scheduler, config, labels, *, shape, guidance_scale, sampler, steps, negative_labels=None,
             init_images=None, strength=1.0, generator=None, frames=None):
    """Draw images from noise (or from a noised init image). Returns [B, 1, 28, 28] in [−1, 1].

    sampler: "ddpm" takes every timestep (Algorithm 2), "ddim" takes `steps` of them, "euler" integrates a flow model.
    frames: a list that receives x after each step (for the animation).
    """
    device = next(model.parameters()).device
    x = gaussian_like(torch.empty(shape, device=device), generator)                  # x_T ~ N(0, I)   [B, 1, 28, 28]
    batch_t = lambda value: torch.full((shape[0],), value, device=device, dtype=torch.float32)

    def predict(x, t):  # the guided network output at timestep t, as ε_θ for DDPM models (as v for flow models)
        output = guided_prediction(model, x, batch_t(t), labels, guidance_scale, negative_labels)
        return scheduler.noise_from_velocity(x, t, output) if config.objective == "eps" and config.prediction == "v" else output

    if sampler == "euler":
        # rectified flow: integrate dx/ds = v_θ(x, s) from s = strength down to 0 with Euler steps
        if init_images is not None:
            x = flow_interpolate(init_images, batch_t(strength), x)                  # x_s = (1−s)·x0 + s·ε
        grid = torch.linspace(strength, 0, steps + 1).tolist()
        for s, s_next in zip(grid[:-1], grid[1:]):
            x = euler_step(x, s, s_next, predict(x, s * (config.num_timesteps - 1)))
            if frames is not None:
                frames.append(x)
        return x
    start_t = round(strength * (config.num_timesteps - 1))
    if init_images is not None:
        x, _ = scheduler.noise_image(init_images, start_t, noise=x)                  # img2img: x_t from the image
    if sampler == "ddpm":
        for t in range(start_t, -1, -1):
            x = scheduler.sample_prev_image_distribution(x, t, predict(x, t), generator, clip_x0=config.clip_x0)
            if frames is not None:
                frames.append(x)
        return x
    timesteps = sampling_timesteps(start_t, steps)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        x = scheduler.ddim_step(x, t, t_prev, predict(x, t), clip_x0=config.clip_x0)
        if frames is not None:
            frames.append(x)
    return x


def default_sampler(config):
    return "euler" if config.objective == "flow" else config.sampler


def save_sample_grid(model, scheduler, config, path, device, per_digit=8, seed=0):
    """The picture written after each epoch: one row per digit (or an 8×8 grid for the unconditional model)."""
    model.eval()
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_digit) if config.cond else None
    n = len(labels) if config.cond else 64
    images = generate(model, scheduler, config, labels, shape=(n, 1, config.image_size, config.image_size),
                      guidance_scale=config.guidance_scale, sampler=default_sampler(config), steps=config.sample_steps,
                      generator=torch.Generator().manual_seed(seed))
    save_grid(images, path, nrow=per_digit if config.cond else 8)
    model.train()


def save_animation(frames, path, nrow, max_frames=60):
    """The denoising as a GIF: one grid per step (at most max_frames of them), holding the last for a second."""
    from PIL import Image
    from torchvision.utils import make_grid
    keep = sorted(set(torch.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().long().tolist()))
    pictures = []
    for i in keep:
        grid = make_grid(to_pixels(frames[i].float().cpu()), nrow=nrow)                 # [3, H, W] in [0, 1]
        pictures.append(Image.fromarray((grid[0] * 255).round().byte().numpy(), mode="L"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:] + [pictures[-1]] * 10, duration=80, loop=0)


def load_init_image(path, size):
    """A grey image for img2img: a .pt tensor [28, 28] in [−1, 1], or any picture file (resized, made grey)."""
    if not os.path.isfile(path):
        raise CliError(f"no init image at {path}")
    try:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        picture = Image.open(path).convert("L").resize((size, size), Image.BILINEAR)
        return pil_to_tensor(picture).float()[None] / 127.5 - 1                         # [1, 1, 28, 28] in [−1, 1]
    except Exception as error:
        raise CliError(f"could not read {path} as an image ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------------
# 7. Evaluation: how good are my samples?
#    A small CNN classifier checks that each sample shows its label, and its features give a Fréchet distance.
# ---------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN for MNIST (> 99% test accuracy after two epochs); features() is its 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        block = lambda c_in, c_out: [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 128), nn.Flatten(),    # 28 → 14 → 7 → 3
                                  nn.Linear(128 * 3 * 3, 128), nn.ReLU())
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, x):
        return self.body(x)  # [B, 128]

    def forward(self, x):
        return self.head(self.body(x))  # [B, 10] logits


@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """Predicted digits [N] and penultimate features [N, 128] of images in [−1, 1]."""
    classifier.eval()
    features = torch.cat([classifier.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    return classifier.head(features).argmax(dim=1), features


def get_classifier(path, data_dir, device, epochs=2):
    """Load the cached classifier next to the checkpoint, or train it (about a minute on 2 CPU cores) and cache it."""
    classifier = Classifier().to(device)
    if os.path.isfile(path):
        try:
            classifier.load_state_dict(torch.load(path, map_location=device, weights_only=True))
            return classifier
        except Exception:  # a damaged cache is only a cache: train a new one
            print(f"could not read the cached classifier {path}; training a new one", flush=True)
    images, labels = load_mnist(data_dir, train=True, device=device)
    test_images, test_labels = load_mnist(data_dir, train=False, device=device)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=2e-3)
    steps = epochs * (len(images) // 128)
    lr_decay = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    classifier.train()
    for step in range(steps):
        batch = torch.randint(0, len(images), (128,), device=device)
        loss = F.cross_entropy(classifier(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_decay.step()
    predicted, _ = classify(classifier, test_images)
    accuracy = (predicted == test_labels).float().mean().item()
    print(f"classifier trained: {accuracy:.2%} on the 10,000 MNIST test images; cached at {path}", flush=True)
    tmp = f"{path}.tmp"
    torch.save(classifier.state_dict(), tmp)
    os.replace(tmp, path)
    return classifier


def frechet_distance(features_a, features_b):
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2·(Σ_a^½ Σ_b Σ_a^½)^½), in float64 (the FID formula, Heusel et al. 2017)."""
    a, b = features_a.double().cpu(), features_b.double().cpu()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_cov_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T          # Σ_a^½
    middle = torch.linalg.eigvalsh(sqrt_cov_a @ cov_b @ sqrt_cov_a).clamp(min=0)                       # eigenvalues of Σ_a^½ Σ_b Σ_a^½
    return ((mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle.sqrt().sum()).item()


def parse_sampler_settings(text, config):
    """"ddim:20,ddpm" → [("ddim", 20), ("ddpm", T)]."""
    settings = []
    for item in filter(None, text.split(",")):
        name, _, steps = item.partition(":")
        if steps and not steps.isdigit():
            raise CliError(f"--samplers takes sampler:steps items such as ddim:20,ddpm; got {item!r}")
        settings.append((name, int(steps) if steps else config.num_timesteps if name == "ddpm" else config.sample_steps))
    return settings


def evaluate(args):
    device = pick_device(args.device)
    model, scheduler, config, state = load_model(args.ckpt, device)
    settings = parse_sampler_settings(args.samplers or f"{default_sampler(config)}:{config.sample_steps}", config)
    for sampler, steps in settings:  # fail on a bad setting before the slow work
        check_sampler(sampler, steps, config)
    classifier = get_classifier(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "mnist_classifier.pt"), args.data_dir, device)
    test_images, _ = load_mnist(args.data_dir, train=False, device=device)
    train_images, _ = load_mnist(args.data_dir, train=True, device=device)
    _, test_features = classify(classifier, test_images)
    n = args.per_label * NUM_CLASSES
    real = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed))[:n].to(device)]
    floor = frechet_distance(classify(classifier, real)[1], test_features)
    print(f"checkpoint {args.ckpt}: step {state['step']}, objective {config.objective}; {n} samples per setting")
    print(f"Fréchet distance of {n} real training images to the test set (the floor): {floor:.2f}")
    scales = args.guidance_scales if config.cond else [0.0]
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.per_label)  # [n]: per_label of each digit
    header = f"{'sampler':>10} {'steps':>5} {'w':>5} {'accuracy':>9} {'worst digit':>12} {'distance':>9} {'s/image':>8}"
    print(header if config.cond else f"{'sampler':>10} {'steps':>5} {'distance':>9} {'s/image':>8}  share of each predicted digit 0-9")
    for sampler, steps in settings:
        for w in scales:
            generator = torch.Generator().manual_seed(args.seed)
            started = time.time()
            samples = torch.cat([generate(model, scheduler, config, labels[i:i + args.batch_size] if config.cond else None,
                                          shape=(len(labels[i:i + args.batch_size]), 1, config.image_size, config.image_size), guidance_scale=w,
                                          sampler=sampler, steps=steps, generator=generator)
                                 for i in range(0, n, args.batch_size)])
            seconds = (time.time() - started) / n
            predicted, features = classify(classifier, samples.clamp(-1, 1))
            distance = frechet_distance(features, test_features)
            if config.cond:
                per_digit = torch.stack([(predicted[labels == d] == d).float().mean() for d in range(NUM_CLASSES)])
                worst = per_digit.argmin().item()
                print(f"{sampler:>10} {steps:>5} {w:>5g} {per_digit.mean().item():>9.1%} {f'{worst}: {per_digit[worst].item():.0%}':>12} "
                      f"{distance:>9.2f} {seconds:>8.3f}", flush=True)
            else:
                shares = torch.bincount(predicted.cpu(), minlength=NUM_CLASSES).float() / n
                print(f"{sampler:>10} {steps:>5} {distance:>9.2f} {seconds:>8.3f}  " + " ".join(f"{s:.0%}" for s in shares.tolist()), flush=True)


# ---------------------------------------------------------------------------------------------
# 8. Command line
#    train / sample / evaluate; bad input gets one clear line and a non-zero exit, never a traceback.
# ---------------------------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps was asked for, but this PyTorch build or machine has no MPS; use --device cpu or auto")
    return name


def check_sampler(sampler, steps, config):
    """Which sampler fits which checkpoint, and how many steps it may take."""
    flow = config.objective == "flow"
    if flow and sampler != "euler":
        raise CliError(f"this checkpoint was trained with --objective flow; it samples with --sampler euler, not {sampler}")
    if not flow and sampler == "euler":
        raise CliError("--sampler euler needs a checkpoint trained with --objective flow; use ddim or ddpm")
    if sampler not in ("ddim", "ddpm", "euler"):
        raise CliError(f"unknown sampler {sampler!r}; choose ddim, ddpm or euler")
    if steps < 1 or (not flow and steps > config.num_timesteps):
        raise CliError(f"--steps must be between 1 and T = {config.num_timesteps}, got {steps}")
    if sampler == "ddpm" and steps != config.num_timesteps:
        raise CliError(f"the DDPM sampler takes all T = {config.num_timesteps} steps; use --sampler ddim for fewer")


def sample(args):
    device = pick_device(args.device)
    model, scheduler, config, _ = load_model(args.ckpt, device)
    if args.label is not None and not config.cond:
        raise CliError(f"{args.ckpt} is an unconditional model; drop --label (or train one with `train --cond`)")
    if args.negative_label is not None and (not config.cond or args.label is None):
        raise CliError("--negative-label needs a conditional checkpoint and a --label")
    sampler = args.sampler or default_sampler(config)
    steps = args.steps or (config.num_timesteps if sampler == "ddpm" else config.sample_steps)
    check_sampler(sampler, steps, config)
    if not config.cond:
        labels, nrow = None, math.ceil(math.sqrt(args.n))
    elif args.label is None:  # a conditional model with no --label: one row per digit
        labels, nrow = torch.arange(NUM_CLASSES, device=device).repeat_interleave(args.n), args.n
    else:
        labels, nrow = torch.full((args.n,), args.label, device=device), math.ceil(math.sqrt(args.n))
    count = args.n if labels is None else len(labels)
    negative = None if args.negative_label is None else torch.full_like(labels, args.negative_label)
    init = None
    if args.init_image:
        init = load_init_image(args.init_image, config.image_size).to(device).expand(count, -1, -1, -1)
    scales = args.guidance_scale or [config.guidance_scale]
    if len(scales) > 1 and args.label is None:
        raise CliError("several --guidance-scale values draw one row per scale; give a --label too")
    rows, frames = [], []
    for w in scales:  # the same seed for every scale: each column starts from the same noise
        row_frames = [] if args.gif else None
        rows.append(generate(model, scheduler, config, labels, shape=(count, 1, config.image_size, config.image_size),
                             guidance_scale=w, sampler=sampler, steps=steps, negative_labels=negative, init_images=init,
                             strength=args.strength if init is not None else 1.0,
                             generator=torch.Generator().manual_seed(args.seed), frames=row_frames))
        frames.append(row_frames)
    nrow = nrow if len(scales) == 1 else args.n
    save_grid(torch.cat(rows), args.output, nrow=nrow)
    print(f"wrote {args.output} ({count * len(scales)} images, {sampler} with {steps} steps)")
    if args.gif:
        save_animation([torch.cat(step) for step in zip(*frames)], args.gif, nrow)
        print(f"wrote {args.gif}")


def digit(text):
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or not 0 <= value < NUM_CLASSES:
        raise argparse.ArgumentTypeError(f"must be a digit 0-9, got {text!r}")
    return value


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return int(text)


def guidance_scales(text):
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or comma-separated numbers, got {text!r}") from None


def strength_value(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (not the whole usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    defaults = Config()
    parser = Parser(description="Diffusion on MNIST in one file: a DDPM/DDIM scheduler, a DiT with "
                                     "cross-attention, classifier-free guidance.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    common.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run (default: auto)")
    common.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    common.add_argument("--data-dir", default="data", help="folder holding MNIST/raw; downloaded there when missing (default: data)")

    train_parser = commands.add_parser("train", parents=[common], help="train a model on MNIST",
                                       description="Train a DiT on MNIST; writes <out-dir>/ckpt.pt and a sample grid after each epoch.")
    train_parser.add_argument("--cond", action="store_true", help="conditional model: cross-attention to the label, label dropout for CFG")
    train_parser.add_argument("--objective", choices=["eps", "flow"], default=defaults.objective,
                              help="eps: DDPM noise prediction; flow: rectified-flow velocity prediction (default: eps)")
    train_parser.add_argument("--prediction", choices=["eps", "v"], default=defaults.prediction,
                              help="what the network outputs for the DDPM objective: ε or v = √ᾱ·ε − √(1−ᾱ)·x0 (default: v)")
    train_parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help=f"passes over the data (default: {defaults.epochs})")
    train_parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (overrides --epochs)")
    train_parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size, help=f"images per step (default: {defaults.batch_size})")
    train_parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default: {defaults.lr})")
    train_parser.add_argument("--label-drop", type=float, default=defaults.label_drop, help=f"probability of replacing a label with ∅ (default: {defaults.label_drop})")
    train_parser.add_argument("--out-dir", default="runs", help="where the checkpoint and sample grids go (default: runs)")
    train_parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    for field in ("patch_size", "width", "depth", "conv_channels", "min_snr_gamma", "warmup_steps"):  # model and schedule knobs, for experiments
        kind = next(f.type for f in fields(Config) if f.name == field)
        train_parser.add_argument("--" + field.replace("_", "-"), type=float if kind in (float, "float") else int,
                                  default=getattr(defaults, field), help=f"(default: {getattr(defaults, field)})")

    sample_parser = commands.add_parser("sample", parents=[common], help="draw images from a checkpoint",
                                        description="Draw a grid of images; CFG with --guidance-scale, img2img with --init-image.")
    sample_parser.add_argument("--ckpt", default="runs/ckpt.pt", help="checkpoint from `train` (default: runs/ckpt.pt)")
    sample_parser.add_argument("--label", type=digit, default=None, help="digit to draw; without it a conditional model draws one row per digit")
    sample_parser.add_argument("--negative-label", type=digit, default=None, help="digit to steer away from (fills the unconditional branch)")
    sample_parser.add_argument("--n", type=positive_int, default=16, help="number of images (per digit without --label) (default: 16)")
    sample_parser.add_argument("--guidance-scale", type=guidance_scales, default=None,
                               help=f"w in ε_∅ + w·(ε_c − ε_∅); several, comma-separated, draw one row each (default: {defaults.guidance_scale})")
    sample_parser.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], default=None, help="ddim (few steps), ddpm (all T steps), euler (flow models) (default: the checkpoint's)")
    sample_parser.add_argument("--steps", type=positive_int, default=None, help=f"ddim/euler steps (default: {defaults.sample_steps})")
    sample_parser.add_argument("--init-image", default=None, help="image-to-image: start from this picture (resized to 28×28, grey)")
    sample_parser.add_argument("--strength", type=strength_value, default=0.6, help="img2img: how far to noise the init image, (0, 1] (default: 0.6)")
    sample_parser.add_argument("--output", default="samples.png", help="PNG grid to write (default: samples.png)")
    sample_parser.add_argument("--gif", default=None, help="also write the denoising as an animated GIF here")

    eval_parser = commands.add_parser("evaluate", parents=[common], help="measure sample quality with a classifier",
                                      description="Label accuracy and Fréchet distance of samples, judged by a small CNN trained on MNIST.")
    eval_parser.add_argument("--ckpt", default="runs/ckpt.pt", help="checkpoint to evaluate (default: runs/ckpt.pt)")
    eval_parser.add_argument("--guidance-scales", type=guidance_scales, default="0,1,2,3,5", help="comma-separated w values (default: 0,1,2,3,5)")
    eval_parser.add_argument("--samplers", default=None, help="comma-separated sampler:steps, e.g. ddim:20,ddpm (default: the checkpoint's)")
    eval_parser.add_argument("--per-label", type=positive_int, default=100, help="samples of each digit (default: 100)")
    eval_parser.add_argument("--batch-size", type=positive_int, default=500, help="images drawn at once (default: 500)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            knobs = {f.name: getattr(args, f.name) for f in fields(Config) if hasattr(args, f.name)}
            train(Config(**knobs), args)
        elif args.command == "sample":
            sample(args)
        else:
            evaluate(args)
    except CliError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
