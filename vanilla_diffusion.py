"""VanillaDiffusion: diffusion in one file, on MNIST or your own pictures; a lecture that runs.

Start here: two trained models ship in assets/models/, so the first command draws at once.
    python vanilla_diffusion.py sample --label 4      # sixteen 4s into samples.png, in seconds
    python vanilla_diffusion.py train --cond          # your own model (9–16 min on 2 CPU cores)
    python vanilla_diffusion.py evaluate              # judge it: label accuracy, Fréchet distance
    python vanilla_diffusion.py show                  # pictures of what it does at each step
    python vanilla_diffusion.py train --cond --vanilla --out-dir runs/vanilla   # exactly Part I

Part I — vanilla diffusion: read it to learn. It uses nothing defined after it, so you may stop
at its end with a complete model. I.1 Config, I.2 the noise scheduler (Ho et al. 2020), I.3 the
DiT (Peebles & Xie 2023), I.4 MNIST, I.5 training (Algorithm 1), I.6 sampling with CFG
(Algorithm 2). Part II — the upgrades, in the order each builds on the last: II.0 knobs, II.1
conv stem, II.2 v- and x0-prediction, II.3 where t is drawn, II.4 EMA, II.5 guidance and the
Denoiser, II.6 the clamped x0, II.7 DDIM, II.8 DPM-Solver++, II.9 classifier guidance, II.10
rectified flow, II.11 the flow SDE, II.12 image-to-image, II.13 the σ view (WebUI's samplers),
II.14 cosine, II.15 a UNet, II.16 latent diffusion, II.17 reflow, II.18 consistency distillation.
Each banner says what the section replaces, the idea and its paper, what it buys, what it needs.
Part III — the tool: data, sampling by name, checkpoints, runs (torchrun), evaluate, show, CLI.

Symbols used in the comments (paper → code):
    T                  → config.num_timesteps        t ∈ {0, …, T−1}, 0-based, indexes the tables
    β_t, α_t = 1 − β_t → scheduler.betas, scheduler.alphas
    ᾱ_t = ∏_{s≤t} α_s  → scheduler.alpha_bar
    SNR_t = ᾱ_t/(1−ᾱ_t) → log_snr(scheduler) (II.3) holds log SNR_t
    σ_t = √((1−ᾱ_t)/ᾱ_t) → sigma_table(scheduler) (II.13), the σ view's noise level, and only
                         that: the reverse step's std (Ho et al.'s σ_t, DDIM's σ_t(η)) is std_t,
                         the flow SDE's noise g_s, the VAE's variance e^ℓ; P_mean, P_std are of
                         log SNR (EDM's: of ln σ = −½·log SNR, II.3)
    ε, ε_θ(x_t, t, c)  → noise, pred_noise
    c, ∅               → labels, NULL_LABEL (the "no label" row of the label embedding)
    w                  → guidance_scale
"""

import argparse
import collections
import copy
import functools
import hashlib
import itertools
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist  # Part III: torchrun's processes
import torch.nn as nn
import torch.nn.functional as F


# =============================================================================================
# Part I — vanilla diffusion
#   DDPM, the denoising diffusion probabilistic model of Ho et al. 2020, with a DiT (diffusion
#   transformer) noise predictor that reads the label through cross-attention, trained with
#   label dropout and sampled with classifier-free guidance (CFG, Ho & Salimans 2022).
#   `train --vanilla` trains and samples exactly this part.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# I.1 Config: one dataclass holds Part I's defaults; checkpoints store it, so `sample` rebuilds
#     the model. Part I's DiT reads the model fields, the training run (Part III) the rest. Part II
#     adds the upgrades' knobs to it (II.0).
#     Needs: `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 10   # MNIST's digits
NULL_LABEL = -1    # "no label" (∅): the label embedding's last row, after the classes'


@dataclass
class Config:
    data: str = "mnist"             # a torchvision set's name, or a folder's absolute path
    class_names: tuple = ()         #   the classes' names; () for MNIST: the digits name themselves
    image_size: int = 28            # MNIST is 28×28, one grey channel, ten digits
    channels: int = 1
    num_classes: int = NUM_CLASSES
    num_timesteps: int = 1000       # T
    beta_start: float = 1e-4        # β_0: the linear schedule of Ho et al.
    beta_end: float = 0.02          # β_{T−1}
    cond: bool = False              # `train --cond`: cross-attention to a label
    patch_size: int = 4             # 4 → 7×7 = 49 tokens
    width: int = 64                 # D, the token width: small, so that CPU minutes buy steps
    depth: int = 3                  # DiT blocks
    heads: int = 2                  # attention heads of D / heads channels each
    mlp_ratio: int = 4              # MLP hidden width = mlp_ratio · D
    label_tokens: int = 4           # tokens per label; with the timestep token, 5 keys
    batch_size: int = 32            # small batches, many steps: a CPU's images/s barely change
    lr: float = 4e-3                # peak learning rate of AdamW
    adam_beta2: float = 0.999       # AdamW's second-moment decay
    warmup_steps: int = 200         # linear warm-up, then cosine decay to 0
    epochs: int = 5                 # passes over the 60,000 images
    label_drop: float = 0.1         # CFG needs the unconditional task too: p(label → ∅)
    guidance_scale: float = 1.5     # w in ε = ε_∅ + w·(ε_c − ε_∅); Ho & Salimans write this
                                    #   (1 + w')·ε_c − w'·ε_∅, so w = 1 + w': 1.5 is their 0.5


# ---------------------------------------------------------------------------------------------
# I.2 Noise scheduler: DDPM, Ho et al. 2020.
#     Forward, in one jump: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (eq. 4). Reverse, one step at a time: x_{t−1}
#     = 1/√α_t·(x_t − β_t/√(1−ᾱ_t)·ε_θ(x_t, t)) + std_t·z (eq. 11, Algorithm 2; the paper's σ_t,
#     renamed here: σ is the σ view's noise level, II.13). t counts from 0: the paper's t = 1 … T is
#     t = 0 … T−1 here; the step at t = 0 gives x0.
#     Needs: nothing but `import torch`.
# ---------------------------------------------------------------------------------------------

def per_sample(table, t, x):
    """table[t] for an int t or a [B] tensor t, shaped [B, 1, 1, 1] to broadcast against x."""
    t = torch.as_tensor(t, device=table.device)
    return table[t].reshape(-1, *([1] * (x.dim() - 1)))


def gaussian_like(x, generator=None):
    """z ~ N(0, I) shaped like x, drawn on the generator's device: a seed gives the same
    images on any device."""
    device = generator.device if generator is not None else x.device
    z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return z.to(x.device)


class NoiseScheduler:
    """The linear β schedule's tables, the forward process and the reverse step."""

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, betas=None):
        self.num_timesteps = num_timesteps                                  # T
        if betas is None:  # Part II's cosine schedule (II.14) passes its own
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
        # computed in float64, kept in float32; t ∈ {0, …, T−1} indexes every table
        self.betas = betas.float()                                          # β_t, linear in t
        self.alphas = alphas.float()                                        # α_t = 1 − β_t
        self.alpha_bar = alpha_bar.float()                                  # ᾱ_t = ∏_{s≤t} α_s
        self.sqrt_alphas = alphas.sqrt().float()                            # √α_t
        self.sqrt_alpha_bar = alpha_bar.sqrt().float()                      # √ᾱ_t
        self.sqrt_one_minus_alpha_bar = (1 - alpha_bar).sqrt().float()      # √(1−ᾱ_t)
        posterior_variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * betas
        self.posterior_variance = posterior_variance.float()    # β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t

    def to(self, device):
        """Move every table to `device`, as nn.Module.to does for a model."""
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                setattr(self, name, value.to(device))
        return self

    def noise_step(self, x_prev, t, noise):
        """One step of the forward chain, q(x_t | x_{t−1}) = N(√(1−β_t)·x_{t−1}, β_t·I) (eq. 2):
        the steps 0, 1, …, t applied to x0 give noise_image's x_t in distribution."""
        return per_sample(self.sqrt_alphas, t, x_prev) * x_prev + per_sample(
            self.betas, t, x_prev).sqrt() * noise

    def noise_image(self, x0, t, noise=None):
        """q(x_t | x0) in one jump: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε; returns (x_t, ε)."""
        if noise is None:
            noise = torch.randn_like(x0)                                    # ε ~ N(0, I)
        signal_part = per_sample(self.sqrt_alpha_bar, t, x0) * x0
        noise_part = per_sample(self.sqrt_one_minus_alpha_bar, t, x0) * noise
        return signal_part + noise_part, noise

    def sample_prev_image_distribution(self, x_t, t, pred_noise, generator=None, variance="beta"):
        """One reverse step x_t → x_{t−1} ~ p_θ(x_{t−1} | x_t), line 4 of Algorithm 2."""
        # 1. the mean μ_θ = 1/√α_t · (x_t − β_t/√(1−ᾱ_t) · ε_θ), eq. 11
        beta = per_sample(self.betas, t, x_t)                               # β_t
        noise_coef = beta / per_sample(self.sqrt_one_minus_alpha_bar, t, x_t)
        mean = (x_t - noise_coef * pred_noise) / per_sample(self.sqrt_alphas, t, x_t)
        # 2. x_{t−1} = μ_θ + std_t·z, z ~ N(0, I), with std_t² = β_t or the posterior's β̃_t (the
        #    paper's §3.2: similar results); the last step (t = 0) adds none
        table = self.betas if variance == "beta" else self.posterior_variance
        z = gaussian_like(x_t, generator)
        not_last = (torch.as_tensor(t, device=x_t.device) > 0).float()
        not_last = not_last.reshape(-1, *([1] * (x_t.dim() - 1)))         # [B, 1, 1, 1]
        return mean + not_last * per_sample(table, t, x_t).sqrt() * z


# ---------------------------------------------------------------------------------------------
# I.3 DiT: a noise predictor ε_θ(x_t, t, c) (Peebles & Xie 2023).
#     Image patches become tokens; the timestep enters every block through adaLN-Zero (adaptive
#     layer norm whose gates start at zero); the label's tokens and the timestep's are the keys and
#     values of a cross-attention, as text is in Stable Diffusion. DiT feeds t + c to adaLN; t there
#     and c through cross-attention is PixArt-α's split (Chen et al. 2023).
#     Needs: I.1, `from dataclasses import dataclass`, `import math`, `import torch.nn as nn`,
#     `import torch.nn.functional as F`.
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


def layer_norm(dim):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # adaLN supplies scale, shift


class DiTBlock(nn.Module):
    """Three residual sub-layers, in this order: self-attention, cross-attention to the
    condition, MLP. The unconditional model has no cross-attention.

    adaLN-Zero: the timestep sets a shift, scale and gate for each sub-layer, in the same order;
    the gates start at 0, so every block starts as the identity.
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
        shift_sa, scale_sa, gate_sa = modulation[:3]        # [B, 1, D] each: self-attention
        shift_mlp, scale_mlp, gate_mlp = modulation[-3:]    # the MLP, always the last
        h = modulate(self.norm_self(x), shift_sa, scale_sa)
        x = x + gate_sa * self.self_attn(h, h)                          # [B, N, D] image ↔ image
        if self.cross_attn is not None:
            shift_ca, scale_ca, gate_ca = modulation[3:6]   # cross-attention, the second
            h = modulate(self.norm_cross(x), shift_ca, scale_ca)
            x = x + gate_ca * self.cross_attn(h, cond_tokens)           # [B, N, D] Q image, KV cond
        h = modulate(self.norm_mlp(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.mlp(h)                               # [B, N, D]


class DiT(nn.Module):
    """ε_θ(x_t, t, c): a noisy image, its timestep and a label in; the predicted noise out."""

    def __init__(self, config, channels=None):
        super().__init__()
        D, p = config.width, config.patch_size
        channels = channels or config.channels
        self.config, self.channels = config, channels
        self.patch_embed = nn.Linear(channels * p * p, D)          # a p×p patch → a token
        positions = position_embedding_2d(config.image_size // p, D)[None]       # [1, N, D]
        self.register_buffer("pos_embed", positions, persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        if config.cond:
            # K + 1 rows (the classes, then ∅), each `label_tokens` tokens for the cross-attention;
            # N(0, 1) rows, not DiT's std 0.02, so the timestep token beside them cannot drown them
            self.label_embed = nn.Embedding(config.num_classes + 1, config.label_tokens * D)
        self.blocks = nn.ModuleList(DiTBlock(D, config.heads, config.mlp_ratio, config.cond)
                                    for _ in range(config.depth))
        self.final_norm = layer_norm(D)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final_linear = nn.Linear(D, channels * p * p)
        for layer in (self.final_ada_ln[1], self.final_linear):  # adaLN-Zero: the output is 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_tokens(self, labels, time_emb):
        """The cross-attention's keys and values: the label's tokens and the timestep token.
        Two keys at least: with one, softmax ≡ 1 and the attention ignores the image."""
        B, D = time_emb.shape
        rows = torch.where(labels == NULL_LABEL, self.config.num_classes, labels)   # ∅ → row K
        label_tokens = self.label_embed(rows).reshape(B, self.config.label_tokens, D)
        return torch.cat([label_tokens, time_emb[:, None]], dim=1)       # [B, L+1, D]

    def forward(self, x_t, t, labels=None):
        # x_t: [B, C, H, W]; t: [B] in [0, T−1] (fractional for flow); labels: [B], ∅ = −1
        p = self.config.patch_size
        x = self.patch_embed(patchify(x_t, p)) + self.pos_embed          # [B, N, D], N = (H/p)²
        time_emb = self.time_mlp(timestep_embedding(t, x.shape[-1]))     # [B, D]
        cond = None
        if self.config.cond:
            cond = self.condition_tokens(labels, time_emb)               # [B, M, D]
        for block in self.blocks:
            x = block(x, time_emb, cond)                                 # [B, N, D]
        shift, scale = self.final_ada_ln(time_emb)[:, None].chunk(2, dim=-1)  # [B, 1, D] each
        x = self.final_linear(modulate(self.final_norm(x), shift, scale))     # [B, N, C·p·p]
        return unpatchify(x, p, self.channels)                           # [B, C, H, W]


# ---------------------------------------------------------------------------------------------
# I.4 Data: MNIST as one uint8 tensor (a quarter of float32's memory); a batch is an index
#     lookup, turned into x0 ∈ [−1, 1] as it is used. Needs: torchvision (imported inside, so
#     the rest of the file runs without it).
# ---------------------------------------------------------------------------------------------

def load_dataset(data_dir, train=True, name="MNIST"):
    """Pixels [N, C, H, W] uint8, labels [N] and the class names of a torchvision data set
    (MNIST, or another of its names), downloaded into data_dir if missing."""
    from torchvision import datasets
    dataset = getattr(datasets, name)(root=data_dir, train=train, download=True)
    pixels = torch.as_tensor(dataset.data)              # [N, H, W] grey or [N, H, W, 3] colour
    pixels = pixels[:, None] if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)
    return pixels.contiguous(), torch.as_tensor(dataset.targets), tuple(dataset.classes)


def as_x0(pixels):
    """uint8 pixels p as x0 = p / 127.5 − 1 ∈ [−1, 1]; float images (samples) stay as they are."""
    return pixels.float() / 127.5 - 1 if pixels.dtype == torch.uint8 else pixels


# ---------------------------------------------------------------------------------------------
# I.5 Training: Algorithm 1 (training) of Ho et al. 2020, with label dropout for CFG.
#     Draw x0, t ~ U{0, …, T−1} and ε; build x_t with noise_image; regress ε_θ onto ε.
#     Needs: I.1, I.2, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

def drop_labels(labels, p, generator=None):
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes ∅ with
    probability p, so one network also learns the unconditional task."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)


def ddpm_loss(model, scheduler, x0, labels, label_drop, generator=None):
    """Algorithm 1, lines 2–5: the loss ‖ε − ε_θ(x_t, t, c)‖² of each image [B] (averaged over
    its pixels), and its t [B]. labels is None for an unconditional model."""
    B, device = x0.shape[0], x0.device
    if labels is not None:
        labels = drop_labels(labels, label_drop, generator)                 # c → ∅ with prob. p
    t = torch.randint(0, scheduler.num_timesteps, (B,), device=device, generator=generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)       # ε ~ N(0, I)
    x_t, _ = scheduler.noise_image(x0, t, noise)                            # √ᾱ_t·x0 + √(1−ᾱ_t)·ε
    pred_noise = model(x_t, t, labels)                                      # ε_θ(x_t, t, c)
    return (pred_noise - noise).pow(2).mean(dim=(1, 2, 3)), t               # [B], [B]


def train_step(model, optimizer, loss, max_grad_norm=1.0):
    """Algorithm 1, line 5: one gradient step on a batch's mean loss (ddpm_loss(…)[0].mean()).
    A non-finite gradient raises a RuntimeError before any weight moves."""
    # backward: the gradient of the loss for every weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()

    # update, with the gradient's norm clipped at max_grad_norm (1, as in Ho et al.'s code)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, error_if_nonfinite=True)
    optimizer.step()


# ---------------------------------------------------------------------------------------------
# I.6 Sampling: Algorithm 2 (sampling) of Ho et al. 2020 with classifier-free guidance.
#     From x_{T−1} ~ N(0, I), T reverse steps; at each, the network sees the label and ∅ in one
#     batched pass and the two predictions are mixed: ε = ε_∅ + w·(ε_c − ε_∅).
#     Needs: I.1, I.2, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_ddpm_cfg(model, scheduler, labels, guidance_scale, shape, generator=None,
                    device="cpu"):
    """Images of `shape` [B, C, H, W] in about [−1, 1], on `device`; labels [B] (None:
    unconditional).
    model is any callable model(x_t, t, labels) → ε_θ."""
    x = gaussian_like(torch.empty(shape, device=device), generator)         # x_{T−1} ~ N(0, I)
    for t in range(scheduler.num_timesteps - 1, -1, -1):
        t_batch = torch.full((shape[0],), float(t), device=device)          # [B]

        # the network's guess of the noise: ε_θ(x_t, t, c) and ε_θ(x_t, t, ∅) in one pass
        if labels is None:
            pred_noise = model(x, t_batch)                                  # nothing to guide
        else:
            null = torch.full_like(labels, NULL_LABEL)
            both = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]),
                         torch.cat([labels, null]))                         # [2B, C, H, W]
            pred_cond, pred_uncond = both.chunk(2)                          # [B, C, H, W] each

            # classifier-free guidance: w = 0 ignores the label, w = 1 follows it, w > 1 insists
            pred_noise = pred_uncond + guidance_scale * (pred_cond - pred_uncond)

        # the reverse step x_t → x_{t−1} (eq. 11); at t = 0 it adds no noise
        x = scheduler.sample_prev_image_distribution(x, t, pred_noise, generator)
    return x


# Part I is complete. To train and sample with nothing else (a tiny model learns in minutes):
#     pixels, labels, _ = load_dataset("data")
#     scheduler, model = NoiseScheduler(), DiT(Config(cond=True))
#     optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
#     for step in range(5000):
#         batch = torch.randint(0, len(pixels), (32,))
#         loss = ddpm_loss(model, scheduler, as_x0(pixels[batch]), labels[batch], 0.1)[0].mean()
#         train_step(model, optimizer, loss)
#     fours = sample_ddpm_cfg(model, scheduler, torch.full((8,), 4), 1.5, (8, 1, 28, 28))


# =============================================================================================
# Part II — the upgrades
#   Each section replaces one piece of Part I and says what it buys. The defaults use II.1–II.6
#   and sample with II.8 on II.7's grid (unconditional) or II.13's DPM++ 2M on Karras σ's
#   (conditional; the README's ladder measures up to II.8); the rest are flags. Each uses Part I
#   and the sections above it, nothing later, and its banner's "Needs:" names every section and
#   import a copy of it needs (besides `import torch`), transitively: copy those and it runs.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# II.0 The upgrades' knobs: Part I's Config, extended.
#   `train --vanilla` switches every upgrade off.
#   Needs: I.1, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

@dataclass
class Config(Config):
    vanilla: bool = False           # train with ddpm_loss and sample with sample_ddpm_cfg
    conv_channels: int = 16         # II.1 conv stem and head around the DiT (0: none)
    prediction: str = "v"           # II.2 the network outputs ε, v or x0 (each converted to ε)
    t_sampling: str = "logsnr"      # II.3 "uniform" t, or "logsnr": log SNR ~ N(P_mean, P_std²)
    logsnr_mean: float = -1.0       #   P_mean: below SNR = 1, where a digit's shape is decided
    logsnr_std: float = 2.0         #   P_std: still reaches the low noise of thin strokes
    min_snr_gamma: float = 0.0      #   min-SNR-γ loss weight; 0: off (it starves high noise)
    ema_decay: float = 0.999        # II.4 sampling weights: θ_ema ← d·θ_ema + (1 − d)·θ
    clip_x0: bool = True            # II.6 clamp the predicted x0 to [−1, 1] at each step
    sampler: str = "dpm++2m-karras"  # II.7–8, II.13 the sampler `sample` uses by default
    sample_steps: int = 15          #   its network evaluations
    guidance_low: float = 0.1       # II.5 guide only where t/(T−1) ∈ [low, high]; else w = 1
    guidance_high: float = 0.7
    guide_at: float = 0.25          # II.5 unconditional: the EMA at this share of training is
                                    #   kept as the weak guide of autoguidance (0: none)
    autoguidance_scale: float = 4.0  # w in ε = ε_guide + w·(ε − ε_guide)
    objective: str = "eps"          # II.10 "eps": the DDPM schedule; "flow": rectified flow
    schedule: str = "linear"        # II.14 Part I's "linear" β, or Nichol & Dhariwal's "cosine"
    arch: str = "dit"               # II.15 the network: "dit" (I.3 and II.1) or "unet"
    unet_channels: int = 32         #   c, the UNet's width at full resolution
    latent: bool = False            # II.16 diffusion in a VAE's latent space
    latent_channels: int = 2        #   L, the latent's channels, at S/f × S/f: 14×14×2 for
    latent_factor: int = 2          #   f    MNIST (docs/experiments.md: the VAE floors)
    latent_scale: float = 1.0       #   k, measured on the training data before the denoiser
    reflow_from: str = ""           # II.17 the flow checkpoint whose coupled pairs it learns
    pairs: int = 0                  #   how many (0: not a reflow)
    distill_from: str = ""          # II.18 the checkpoint whose consistency function it learns
    teacher_digest: str = ""        #   its file's SHA-256: a resume checks it is the same file
    consistency_steps: int = 10     #   N, the steps of the distillation grid


# ---------------------------------------------------------------------------------------------
# II.1 A conv stem and head around the DiT
#   Replaces: I.3's linear patch embedding, whose 4×4 patches leave 4×4 blocks in the samples.
#   Idea: two 3×3 convolutions give each pixel local features before patchify, and a conv head reads
#   the unpatchified tokens beside those full-resolution features (a U-Net-style skip).
#   Buys: at equal time, Part I's distance 107 → 48 (the README's ladder), 11% slower a step.
#   Needs: I.1, I.3, II.0, `from dataclasses import dataclass`, `import math`,
#   `import torch.nn as nn`, `import torch.nn.functional as F`.
# ---------------------------------------------------------------------------------------------

class ConvDiT(DiT):
    """The DiT of I.3 between a conv stem (image channels → C) and a conv head (2C → image)."""

    def __init__(self, config):
        C = config.conv_channels
        super().__init__(config, channels=C)  # the transformer works on C-channel patches
        self.stem = nn.Sequential(nn.Conv2d(config.channels, C, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(C, C, 3, padding=1))
        self.head = nn.Sequential(nn.Conv2d(2 * C, C, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(C, config.channels, 3, padding=1))
        self.final_linear.reset_parameters()  # the head's last conv starts at 0 instead
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t, t, labels=None):
        pixels = self.stem(x_t)                                          # [B, C, H, W]
        x = super().forward(pixels, t, labels)                           # [B, C, H, W]
        return self.head(torch.cat([x, pixels], dim=1))                  # [B, 1 or 3, H, W]


# ---------------------------------------------------------------------------------------------
# II.2 v-prediction (Salimans & Ho 2022), and x0
#   Replaces: I.5's target ε. The network outputs v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 instead (or x0 itself,
#   the clean image), and every sampler converts it back to ε first, so the formulas of Part I stay
#   as they are.
#   Idea: at high noise ε is almost x_t itself and carries no news, while v ≈ −x0: the network is
#   asked to draw the image. Predicting x0 asks the same at high noise, but at low noise ε = (x_t −
#   √ᾱ_t·x0)/√(1−ᾱ_t) divides its small errors by √(1−ᾱ_t) ≈ 0.01.
#   Buys: v, the ladder's largest rung, distance 48 → 5.8; x0: docs/experiments.md.
#   Needs: I.2.
# ---------------------------------------------------------------------------------------------

def velocity(scheduler, x0, t, noise):
    """The target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0."""
    sqrt_alpha_bar = per_sample(scheduler.sqrt_alpha_bar, t, x0)
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, x0)
    return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0


def noise_from_velocity(scheduler, x_t, t, pred_velocity):
    """ε_θ = √ᾱ_t·v_θ + √(1−ᾱ_t)·x_t: a v-network feeds the same ε formulas as an ε-network."""
    sqrt_alpha_bar = per_sample(scheduler.sqrt_alpha_bar, t, x_t)
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, x_t)
    return sqrt_alpha_bar * pred_velocity + sqrt_one_minus_alpha_bar * x_t


def noise_from_x0(scheduler, x_t, t, x0):
    """ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t): the noise that x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε implies."""
    sqrt_alpha_bar = per_sample(scheduler.sqrt_alpha_bar, t, x_t)
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, x_t)
    return (x_t - sqrt_alpha_bar * x0) / sqrt_one_minus_alpha_bar


def noise_from_output(scheduler, x_t, t, output, prediction):
    """The network's output as ε_θ, whichever target it was trained on."""
    if prediction == "v":
        return noise_from_velocity(scheduler, x_t, t, output)
    if prediction == "x0":
        return noise_from_x0(scheduler, x_t, t, output)
    return output


# ---------------------------------------------------------------------------------------------
# II.3 Where t is drawn: log SNR ~ N(P_mean, P_std²) (EDM's log-normal, Karras et al. 2022)
#   Replaces: I.5's uniform t. With the linear β, half of the uniform draws have SNR < 0.09, almost
#   pure noise; drawing log SNR from N(−1, 2²) puts 77% of the steps at t ∈ [200, 700), where a
#   digit's shape is decided, and 6% below t = 100, where its background is cleaned (N(−2, 2²),
#   the unconditional model's: 2%). (EDM draws ln σ = −½·log SNR ~ N(P_mean, P_std²): this
#   default is their N(0.5, 1); their own (−1.2, 1.2) reads --logsnr-mean 2.4 --logsnr-std 2.4.)
#   Buys: distance 5.8 → 5.1 at equal time, at mean −2 (the ladder); −1 then cleans the background:
#   7.8% → 5.8% faint pixels (docs/experiments.md). min-SNR-γ (Hang et al. 2023) weights the loss
#   instead; it is off, since it starves that range.
#   Needs: I.1, I.2, I.5, II.0, II.2, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

def log_snr(scheduler):
    """log SNR_t = log(ᾱ_t/(1−ᾱ_t)) [T], decreasing in t; from the square-root tables, whose
    float64 origin keeps 1−ᾱ_t exact at small t."""
    return 2 * (scheduler.sqrt_alpha_bar.log() - scheduler.sqrt_one_minus_alpha_bar.log())


def sample_timesteps(scheduler, batch_size, config, generator=None):
    """t [B]: uniform, or the first t whose log SNR_t is at most a draw of N(P_mean, P_std²)."""
    device = scheduler.betas.device
    if config.t_sampling == "uniform":
        return torch.randint(0, config.num_timesteps, (batch_size,), device=device,
                             generator=generator)
    draw = torch.randn(batch_size, device=device, generator=generator)
    draw = config.logsnr_mean + config.logsnr_std * draw       # log SNR ~ N(P_mean, P_std²)
    t = torch.searchsorted(-log_snr(scheduler), -draw)                  # first t: log SNR_t ≤ draw
    return t.clamp(max=config.num_timesteps - 1)


def min_snr_weight(snr, gamma, prediction):
    """min(SNR, γ)/SNR for an ε-loss, min(SNR, γ)/(SNR + 1) for a v-loss, min(SNR, γ) for an
    x0-loss (the same weight on ‖x0 − x̂0‖² each way); γ = 0 switches it off."""
    if gamma <= 0:
        return torch.ones_like(snr)
    denominator = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
    return snr.clamp(max=gamma) / denominator


def training_target(scheduler, x0, t, noise, prediction):
    """What the network learns to output: ε, v (II.2) or x0."""
    if prediction == "v":
        return velocity(scheduler, x0, t, noise)
    return x0 if prediction == "x0" else noise


def denoising_loss(model, scheduler, x0, labels, config, generator=None):
    """I.5's ddpm_loss with t from sample_timesteps and the target ε, v or x0 (II.2), times the
    min-SNR weight when γ > 0: the loss of each image [B], and t/T [B]."""
    B, device = x0.shape[0], x0.device
    if labels is not None:
        labels = drop_labels(labels, config.label_drop, generator)
    t = sample_timesteps(scheduler, B, config, generator)
    noise = torch.randn(x0.shape, device=device, generator=generator)
    x_t, _ = scheduler.noise_image(x0, t, noise)
    target = training_target(scheduler, x0, t, noise, config.prediction)
    per_image = (model(x_t, t, labels) - target).pow(2).mean(dim=(1, 2, 3))        # [B]
    snr = log_snr(scheduler)[t].exp()
    weight = min_snr_weight(snr, config.min_snr_gamma, config.prediction)
    return weight * per_image, t.float() / config.num_timesteps


# ---------------------------------------------------------------------------------------------
# II.4 An exponential moving average (EMA) of the weights
#   Replaces: sampling with the last weights of training.
#   Idea: the average of the weights over the last stretch of training is a better model than any
#   one of them (Ho et al. 2020 used d = 0.9999; Karras et al. 2024 analyse its length). Sampling
#   always uses the EMA.
#   Buys: distance 5.1 → 4.9 (the ladder).
#   Needs: nothing but `import torch`.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def update_ema(ema, model, decay):
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)  # θ_ema ← d·θ_ema + (1 − d)·θ


def ema_decay_at(step, max_decay):
    """d = (1 + s)/(10 + s) at step s, an average over about the last s/9 steps, capped at
    max_decay (config.ema_decay: 0.999 is reached after ~9,000 steps); 0: the EMA is the model."""
    return min(max_decay, (1 + step) / (10 + step))


# ---------------------------------------------------------------------------------------------
# II.5 Guidance, generalised: negative labels, autoguidance, a limited interval
#   Replaces: I.6's ε = ε_∅ + w·(ε_c − ε_∅), with the same formula for two other pairs. A negative
#   label n fills the ∅ branch (ε_n), so the sample is pushed away from n. An unconditional model
#   has no ∅ branch; autoguidance (Karras et al. 2024) uses a weaker copy of itself, its EMA frozen
#   early in training: ε = ε_guide + w·(ε − ε_guide). Guidance in a limited interval (Kynkäänniemi
#   et al. 2024) applies w only where t/(T−1) ∈ [low, high].
#   Buys: the interval [0.1, 0.7], distance 4.2 → 3.8 (the ladder); for the unconditional model,
#   faint speckle 19% → 6.5% (docs/experiments.md). The Denoiser below is the adapter every Part II
#   sampler is driven with: a network in, denoise(x, t) → ε_θ(x_t, t) out, with t as a tensor, v or
#   x0 turned into ε, and guidance.
#   Needs: I.1, I.2, II.0, II.2, `import copy`, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

def guided_prediction(model, x, t, labels, guidance_scale, negative_labels=None, guide=None):
    """I.6's guided ε, from one batched pass of [cond; uncond]: w = 1 is the model alone, one
    pass for every model; with labels None and a guide, autoguidance."""
    if guidance_scale == 1 or (labels is None and guide is None):
        return model(x, t, labels)
    if labels is None:  # autoguidance
        pred_guide = guide(x, t, None)
        return pred_guide + guidance_scale * (model(x, t, None) - pred_guide)
    null = torch.full_like(labels, NULL_LABEL)
    uncond_labels = null if negative_labels is None else negative_labels    # ∅, or n
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, uncond_labels]))
    pred_cond, pred_uncond = both.chunk(2)                              # [B, C, H, W] each
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


def guide_snapshot(ema, step, total_steps, guide_at):
    """Autoguidance's weak guide: a frozen copy of the EMA (II.4) after the step that ends the
    share guide_at of training (guide_at = 0: never); None at every other step."""
    if step + 1 == round(guide_at * total_steps):
        return copy.deepcopy(ema).eval()
    return None


def guidance_at(t, num_timesteps, guidance_scale, interval):
    """w where t/(T−1) ∈ [low, high]; elsewhere 1, the model alone in one pass."""
    low, high = interval
    inside = low <= t / (num_timesteps - 1) <= high
    return guidance_scale if inside else 1.0


class Denoiser:
    """The adapter from a network to what every Part II sampler asks: denoise(x, t) → the
    guided ε_θ(x_t, t), for an int t.

    t becomes a [B] tensor; a v- or x0-network's output becomes ε (II.2); guidance applies
    inside its interval; classifier_guide (II.9), if given, turns ε into ε̂. For a flow model
    (II.10) the output is the velocity v_θ, and t = s·(T−1).
    """

    def __init__(self, model, scheduler, config, labels=None, guidance_scale=1.0,
                 negative_labels=None, guidance_interval=(0.0, 1.0), guide=None,
                 classifier_guide=None):
        self.model, self.scheduler, self.config = model, scheduler, config
        self.labels, self.negative_labels, self.guide = labels, negative_labels, guide
        self.guidance_scale, self.guidance_interval = guidance_scale, guidance_interval
        self.classifier_guide = classifier_guide

    def __call__(self, x, t):
        t_batch = torch.full((len(x),), float(t), device=x.device)     # [B]
        w = guidance_at(t, self.config.num_timesteps, self.guidance_scale, self.guidance_interval)
        output = guided_prediction(self.model, x, t_batch, self.labels, w, self.negative_labels,
                                   self.guide)
        if self.config.objective == "eps":  # ε_θ from v_θ or x0_θ
            output = noise_from_output(self.scheduler, x, t, output, self.config.prediction)
        if self.classifier_guide is not None:
            output = self.classifier_guide.noise(x, t, output)          # ε̂ = ε − s·√(1−ᾱ)·g
        return output


# ---------------------------------------------------------------------------------------------
# II.6 The predicted x0, clamped (as the DDPM reference code does)
#   Replaces: I.6's use of ε_θ as it is. From x_t and ε_θ the step implies a guess of the clean
#   image, x0 = (x_t − √(1−ᾱ_t)·ε_θ)/√ᾱ_t; clamping it to the data range [−1, 1] and stepping with
#   the ε that matches the clamped x0 keeps an early, wild guess from throwing pixels out.
#   ddpm_sampler is I.6's loop with this clamp, any network output (denoise) and any start.
#   Buys: at the default w, nothing measurable (the ladder: 4.93 → 4.92).
#   Needs: I.2, II.2. Drive it with II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

def predict_x0(scheduler, x_t, t, pred_noise):
    """Invert the forward process: x0 = (x_t − √(1−ᾱ_t)·ε_θ) / √ᾱ_t."""
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, x_t)
    sqrt_alpha_bar = per_sample(scheduler.sqrt_alpha_bar, t, x_t)
    return (x_t - sqrt_one_minus_alpha_bar * pred_noise) / sqrt_alpha_bar


def clamp_prediction(scheduler, x_t, t, pred_noise):
    """x0 clamped to [−1, 1], and the ε that matches it: ε = (x_t − √ᾱ_t·x0) / √(1−ᾱ_t)."""
    x0 = predict_x0(scheduler, x_t, t, pred_noise).clamp(-1, 1)
    return x0, noise_from_x0(scheduler, x_t, t, x0)


def ddpm_sampler(denoise, scheduler, x, start_t, generator=None, clip_x0=True, mean_shift=None,
                 variance="beta"):
    """Algorithm 2 from start_t down to 0; denoise(x, t) returns ε_θ(x_t, t), guided;
    mean_shift(x, t), if given, moves the step's mean (II.9's classifier guidance); variance:
    std_t² = β_t or the posterior's β̃_t (I.2)."""
    for t in range(start_t, -1, -1):
        pred_noise = denoise(x, t)                                      # ε_θ(x_t, t)
        if clip_x0:
            pred_noise = clamp_prediction(scheduler, x, t, pred_noise)[1]
        shift = 0.0 if mean_shift is None else mean_shift(x, t)
        x = scheduler.sample_prev_image_distribution(x, t, pred_noise, generator, variance)
        x = x + shift
        yield x                                                         # x_{t−1}


# ---------------------------------------------------------------------------------------------
# II.7 DDIM (Song et al. 2021)
#   Replaces: I.6's T stochastic steps with a few deterministic ones. The same network and the same
#   x0 guess, but the step jumps from t to any earlier t_prev (eq. 12), with η scaling the fresh
#   noise (η = 1 between consecutive steps is DDPM with std_t² = β̃_t, the posterior variance).
#   Buys: 20 steps, not T: 99.8% accuracy (DDPM 99.7%) at 0.10 s an image, not 2.8.
#   Needs: I.2, II.2, II.6. Drive it with II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

def ddim_step(scheduler, x_t, t, t_prev, pred_noise, eta=0.0, generator=None, clip_x0=False):
    """One DDIM step x_t → x_{t_prev}, eq. 12; t_prev = −1 means "to x0"."""
    alpha_bar = per_sample(scheduler.alpha_bar, t, x_t)
    alpha_bar_prev = (per_sample(scheduler.alpha_bar, t_prev, x_t) if t_prev >= 0
                      else torch.ones_like(alpha_bar))                  # to x0: ᾱ = 1
    # 1. the predicted x0 (II.6), optionally clamped along with the ε that matches it
    if clip_x0:
        x0, pred_noise = clamp_prediction(scheduler, x_t, t, pred_noise)
    else:
        x0 = predict_x0(scheduler, x_t, t, pred_noise)
    # 2. the step's std = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev) (their σ_t(η), eq. 16)
    std = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)).sqrt()
    std = std * (1 - alpha_bar / alpha_bar_prev).sqrt()
    # 3. x_prev = √ᾱ_prev·x0 + √(1−ᾱ_prev−std²)·ε_θ + std·z: the predicted x0, the direction
    #    pointing to x_t, and fresh noise
    direction = (1 - alpha_bar_prev - std**2).clamp(min=0).sqrt() * pred_noise
    z = gaussian_like(x_t, generator) if eta > 0 else 0.0
    return alpha_bar_prev.sqrt() * x0 + direction + std * z


def sampling_timesteps(start_t, steps):
    """`steps` timesteps evenly spaced from start_t down to start_t/steps; the sampler's last
    step then goes from there to x0 in one jump. Stopping above 0 avoids the low-noise t where
    the network, trained little there (II.3), adds speckle (the spacing of diffusers)."""
    timesteps = torch.linspace(start_t, 0, steps + 1)[:-1]                  # drop the 0
    return timesteps.round().long().unique_consecutive().tolist()


def ddim_sampler(denoise, scheduler, x, timesteps, clip_x0=True, eta=0.0, generator=None):
    """DDIM on the given timesteps (η = 0: deterministic); the last step lands on x0."""
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        pred_noise = denoise(x, t)                                      # ε_θ(x_t, t)
        x = ddim_step(scheduler, x, t, t_prev, pred_noise, eta, generator, clip_x0)
        yield x                                                         # x_{t_prev}


# ---------------------------------------------------------------------------------------------
# II.8 DPM-Solver++(2M) (Lu et al. 2022)
#   Replaces: DDIM's first-order step. DDIM is the exponential integrator of the probability-flow
#   ODE in λ = ½·log SNR with x0 held fixed over a step; 2M extrapolates x0 linearly from the
#   previous step's guess, second order.
#   Buys: 15 evaluations reach distance 4.2 where DDIM's 20 reach 4.9 (the ladder).
#   Needs: I.1, I.2, I.5, II.0, II.2, II.3, II.6, `from dataclasses import dataclass`. Drive it with
#   II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

def dpm_solver_step(scheduler, x_t, t, t_next, x0, prev_x0=None, h_prev=None):
    """One step x_t → x_{t_next} from the data prediction x0 (Lu et al. 2022, Algorithm 2).
    With the previous step's x0 it is second order; without it, first order, and then exactly
    ddim_step with η = 0. Returns x_{t_next} and the step h."""
    # 1. the step size in half-log-SNR: h = λ_{t_next} − λ_t, λ = ½·log SNR
    lambdas = log_snr(scheduler) / 2
    h = lambdas[t_next] - lambdas[t]
    # 2. second order: D = (1 + 1/(2r))·x0 − 1/(2r)·x0_prev, with r = h_prev / h
    if prev_x0 is not None:
        r = h_prev / h
        x0 = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
    # 3. the exponential integrator: x_next = (√(1−ᾱ_next)/√(1−ᾱ_t))·x_t − √ᾱ_next·(e^{−h} − 1)·D
    #    (Lu et al. write α_t = √ᾱ_t and σ_t = √(1−ᾱ_t))
    sigma_ratio = (scheduler.sqrt_one_minus_alpha_bar[t_next]
                   / scheduler.sqrt_one_minus_alpha_bar[t])
    return sigma_ratio * x_t - scheduler.sqrt_alpha_bar[t_next] * torch.expm1(-h) * x0, h


def dpm_solver_sampler(denoise, scheduler, x, timesteps, clip_x0=True):
    """DPM-Solver++(2M) on the given timesteps; the last step lands on x0."""
    prev_x0, h_prev = None, None
    for t, t_next in zip(timesteps, timesteps[1:] + [-1]):
        pred_noise = denoise(x, t)                                      # ε_θ(x_t, t)
        x0 = predict_x0(scheduler, x, t, pred_noise)                    # x0_θ(x_t, t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        if t_next < 0:
            x = x0                                                      # ᾱ = 1: the data itself
        else:
            x, h = dpm_solver_step(scheduler, x, t, t_next, x0, prev_x0, h_prev)
            prev_x0, h_prev = x0, h
        yield x                                                         # x_{t_next}


# ---------------------------------------------------------------------------------------------
# II.9 Classifier guidance (Dhariwal & Nichol 2021), the method CFG replaced
#   Replaces: I.6's ∅ branch. A separate classifier p_φ(y | x_t, t), trained on noised images,
#   steers any model, an unconditional one too, along g = ∇_{x_t} log p_φ(y | x_t, t). Sampling
#   p(x_t)·p_φ(y | x_t)^s adds s·g to the score ∇log p(x_t) = −ε/√(1−ᾱ_t), so for DDIM and
#   DPM-Solver++ ε̂ = ε_θ − s·√(1−ᾱ_t)·g (their Algorithm 2); DDPM shifts the step's mean, μ → μ +
#   s·std_t²·g (Algorithm 1). CFG won: no second network, no gradient at every step (README:
#   "Classifier guidance, the method CFG replaced").
#   Buys: steering for an unconditional model, at a gradient a step (README, "Classifier
#   guidance, the method CFG replaced").
#   Needs: I.1, I.2, I.3, I.4, I.5, `from dataclasses import dataclass`, `import math`,
#   `import torch.nn as nn`, `import torch.nn.functional as F`.
# ---------------------------------------------------------------------------------------------

def conv_block(c_in, c_out):
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.MaxPool2d(2)]


class NoisyClassifier(nn.Module):
    """p_φ(y | x_t, t): three conv blocks (28 → 14 → 7 → 3 for MNIST), each told the timestep."""

    def __init__(self, image_channels=1, image_size=28, num_classes=NUM_CLASSES, time_dim=64):
        super().__init__()
        channels = (image_channels, 32, 64, 128)
        self.blocks = nn.ModuleList(nn.Sequential(*conv_block(c_in, c_out))
                                    for c_in, c_out in zip(channels, channels[1:]))
        self.time = nn.ModuleList(nn.Linear(time_dim, c) for c in channels[1:])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128 * (image_size // 8) ** 2, 128),
                                  nn.ReLU(), nn.Linear(128, num_classes))
        self.time_dim = time_dim

    def forward(self, x_t, t):
        time_emb = timestep_embedding(t, self.time_dim)                 # [B, 64]
        h = x_t                                                         # [B, C, H, W]
        for block, time in zip(self.blocks, self.time):
            h = block(h) + time(time_emb)[:, :, None, None]             # [B, C, H/2, W/2]
        return self.head(h)                                             # [B, K] logits


def noisy_classifier_loss(classifier, scheduler, x0, labels, generator=None):
    """Cross-entropy on x_t = noise_image(x0, t), t ~ U{0, …, T−1} as in I.5; and t [B]."""
    t = torch.randint(0, scheduler.num_timesteps, (len(x0),), device=x0.device,
                      generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    x_t, _ = scheduler.noise_image(x0, t, noise)
    return F.cross_entropy(classifier(x_t, t), labels), t


def fit_network(network, loss_fn, images, labels, epochs, progress=None, batch_size=128):
    """Adam with a one-cycle learning rate on random batches of uint8 images, loss_fn(network,
    x0, labels) → the batch's loss; progress(step, steps, loss), if given, after every step."""
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    steps = max(1, epochs * (len(images) // batch_size))
    lr_decay = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    network.train()
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(images), (batch_size,), device=images.device)
        loss = loss_fn(network, as_x0(images[batch]), labels[batch])
        train_step(network, optimizer, loss, max_grad_norm=math.inf)    # I.5's step, unclipped
        lr_decay.step()
        if progress is not None:
            progress(step, steps, loss)
    return network.eval()


def train_noisy_classifier(classifier, scheduler, images, labels, epochs=3, progress=None):
    """p_φ fitted on noise_image of uint8 images [N, C, S, S] by fit_network above."""
    loss = lambda net, x0, y: noisy_classifier_loss(net, scheduler, x0, y)[0]
    return fit_network(classifier, loss, images, labels, epochs, progress)


def classifier_gradient(classifier, x_t, t, labels):
    """g = ∇_{x_t} log p_φ(y | x_t, t) [B, C, H, W], by autograd through the classifier."""
    with torch.enable_grad():
        x_t = x_t.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_t, t), dim=-1)               # [B, 10]
        rows = torch.arange(len(x_t), device=x_t.device)
        chosen = log_probs[rows, labels].sum()                              # Σ_b log p(y_b | x_b)
        return torch.autograd.grad(chosen, x_t)[0]


def classifier_guided_noise(scheduler, pred_noise, t, gradient, scale):
    """DDIM and DPM-Solver++: ε̂ = ε_θ − s·√(1−ᾱ_t)·g."""
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, pred_noise)
    return pred_noise - scale * sqrt_one_minus_alpha_bar * gradient


def classifier_mean_shift(scheduler, t, gradient, scale, variance="beta"):
    """DDPM: the shift s·std_t²·g of the reverse step's mean, with the step's own variance
    std_t² (β_t, or the posterior's β̃_t: I.2's `variance`)."""
    table = scheduler.betas if variance == "beta" else scheduler.posterior_variance
    return scale * per_sample(table, t, gradient) * gradient


class ClassifierGuide:
    """Classifier guidance for the samplers: g from the noisy classifier for the wanted labels,
    applied as ε̂ (give it to II.5's Denoiser: DDIM, DPM-Solver++, the σ samplers) or as a
    shift of DDPM's mean (ddpm_sampler's mean_shift)."""

    def __init__(self, classifier, scheduler, labels, scale, variance="beta"):
        self.classifier, self.scheduler = classifier.eval(), scheduler
        self.labels, self.scale, self.variance = labels, scale, variance

    def gradient(self, x, t):
        t_batch = torch.full((len(x),), float(t), device=x.device)     # [B]
        return classifier_gradient(self.classifier, x, t_batch, self.labels)

    def noise(self, x, t, pred_noise):
        return classifier_guided_noise(self.scheduler, pred_noise, t, self.gradient(x, t),
                                       self.scale)

    def mean_shift(self, x, t):
        return classifier_mean_shift(self.scheduler, t, self.gradient(x, t), self.scale,
                                     self.variance)


# ---------------------------------------------------------------------------------------------
# II.10 Rectified flow (Liu et al. 2022; the logit-normal s of Esser et al. 2024)
#   Replaces: the DDPM schedule and its curved path. The data x0 (s = 0) and the noise ε (s = 1) are
#   joined by a straight line, the network learns its velocity v = ε − x0, and sampling integrates
#   dx/ds = v_θ with Euler steps. The network reads s as t = s·(T−1).
#   Buys: at w = 2, the DDPM default's distance with Euler 20 (README, "More in the file").
#   Needs: I.1, I.2, I.5, `from dataclasses import dataclass`. Drive euler_sampler with II.5's
#   Denoiser.
# ---------------------------------------------------------------------------------------------

def flow_interpolate(x0, s, noise):
    """x_s = (1 − s)·x0 + s·ε; the velocity along the line is v = dx_s/ds = ε − x0."""
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))  # [B, 1, 1, 1]
    return (1 - s) * x0 + s * noise


def flow_matching_loss(model, x0, labels, config, generator=None, noise=None):
    """s ~ sigmoid(N(0, 1)), x_s = (1−s)·x0 + s·ε, loss ‖v_θ − (ε − x0)‖²: each image's [B],
    and s [B]. ε is a fresh draw, or the given noise (II.17's coupled pairs)."""
    B, device = x0.shape[0], x0.device
    if labels is not None:
        labels = drop_labels(labels, config.label_drop, generator)
    s = torch.sigmoid(torch.randn(B, device=device, generator=generator))
    if noise is None:
        noise = torch.randn(x0.shape, device=device, generator=generator)
    pred_velocity = model(flow_interpolate(x0, s, noise), s * (config.num_timesteps - 1), labels)
    return (pred_velocity - (noise - x0)).pow(2).mean(dim=(1, 2, 3)), s


def euler_step(x_s, s, s_next, velocity):
    """One Euler step of dx/ds = v from s to s_next (< s): x_{s_next} = x_s + (s_next − s)·v."""
    return x_s + (s_next - s) * velocity


def flow_grid(steps, start=1.0):
    """Euler's grid s_0 = start > … > s_steps = 0, evenly spaced (start < 1: image-to-image)."""
    return torch.linspace(start, 0, steps + 1).tolist()


def euler_sampler(denoise, x, s_grid, num_timesteps):
    """Integrate dx/ds = v_θ(x, s) down the grid s_0 > s_1 > … > 0."""
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        pred_velocity = denoise(x, s * (num_timesteps - 1))             # v_θ(x_s, s)
        x = euler_step(x, s, s_next, pred_velocity)
        yield x                                                         # x_{s_next}


# ---------------------------------------------------------------------------------------------
# II.11 A flow sampled with noise: the SDE of Flow-GRPO (Liu et al. 2025, eq. 9)
#   Replaces: II.10's deterministic Euler steps, optionally.
#   Idea: the flow's ODE has a family of SDEs with the same marginals p_s. Pick the diffusion
#   coefficient g_s = a·√(s/(1−s)) (Flow-GRPO's σ_t); the score ∇log p_s = −(x + (1−s)·v)/s, known
#   from v, corrects the drift: x ← x + [v + g_s²/(2s)·(x + (1−s)·v)]·ds + g_s·√(−ds)·z, ds = s_next
#   − s < 0. a = 0 is Euler exactly; larger a adds fresh noise each step, like DDPM against DDIM. At
#   s = 1, where 1 − s = 0, g_s reads 1 − s_next (as Flow-GRPO does); the last step, to s = 0, is
#   Euler's.
#   Buys: docs/experiments.md, "The flow SDE on a flow checkpoint".
#   Needs: I.1, I.2, I.5, II.10, `from dataclasses import dataclass`, `import math`.
# ---------------------------------------------------------------------------------------------

def flow_sde_step(x_s, s, s_next, velocity, noise_scale, z):
    """One step of the flow SDE from s to s_next < s, with fresh noise z ~ N(0, I)."""
    ds = s_next - s                                                     # < 0
    one_minus_s = 1 - s if s < 1 else 1 - s_next                        # g_s is finite at s = 1
    g = noise_scale * math.sqrt(s / one_minus_s)                        # g_s = a·√(s/(1−s))
    drift = velocity + g**2 / (2 * s) * (x_s + (1 - s) * velocity)      # v − g²/2·∇log p_s
    return x_s + drift * ds + g * math.sqrt(-ds) * z


def flow_sde_sampler(denoise, x, s_grid, num_timesteps, noise_scale, generator=None):
    """Integrate the flow SDE down the grid s_0 > s_1 > … > 0; noise_scale 0 is euler_sampler."""
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        pred_velocity = denoise(x, s * (num_timesteps - 1))             # v_θ(x_s, s)
        if s_next == 0:
            x = euler_step(x, s, s_next, pred_velocity)                 # the last step: no noise
        else:
            z = gaussian_like(x, generator)
            x = flow_sde_step(x, s, s_next, pred_velocity, noise_scale, z)
        yield x                                                         # x_{s_next}


# ---------------------------------------------------------------------------------------------
# II.12 Image-to-image (SDEdit, Meng et al. 2022)
#   Replaces: I.6's start from pure noise. The picture is noised with noise_image to t =
#   strength·(T−1) and denoised from there: strength 1 forgets it, small strengths keep it.
#   Buys: edits of a real picture (README, "More in the file").
#   Needs: I.1, I.2, I.5, II.0, II.10, `from dataclasses import dataclass`.
# ---------------------------------------------------------------------------------------------

def noised_start(scheduler, config, init_images, strength, noise):
    """Image-to-image's starting point: the picture noised to t = strength·(T−1) (for a flow
    model: moved to s = strength along the straight line of II.10)."""
    if config.objective == "flow":
        s = torch.full((len(init_images),), strength, device=init_images.device)
        return flow_interpolate(init_images, s, noise)                  # x_s = (1−s)·x0 + s·ε
    start_t = round(strength * (config.num_timesteps - 1))
    return scheduler.noise_image(init_images, start_t, noise)[0]        # x_t = √ᾱ·x0 + √(1−ᾱ)·ε


# ---------------------------------------------------------------------------------------------
# II.13 The σ view (Karras et al. 2022, "EDM") and the samplers WebUI users know
#   Replaces: II.7–8's steps on the timestep grid (the conditional default; a flag otherwise).
#   Idea: divide x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε by √ᾱ_t: x = x0 + σ·ε, with σ_t = √((1−ᾱ_t)/ᾱ_t). In
#   this scale the probability-flow ODE is dx/dσ = (x − D(x; σ))/σ, where the denoiser D(x; σ) = x −
#   σ·ε_θ(x/√(σ²+1), t_σ) is the network's clean image; so every ε-, v- or x0-network of this file
#   is a D, and the σ-space solvers of k-diffusion apply as written: Euler (EDM Algorithm 1 without
#   its second-order correction; WebUI "Euler"), Euler ancestral ("Euler a"), Heun (EDM Algorithm 1,
#   "Heun"), DPM++ 2M and DPM++ 2M SDE (Lu et al. 2022). A σ between two entries of the table is
#   moved to the nearest entry in log σ before sampling, so the network sees only timesteps it was
#   trained on, every conversion is exact, and Euler on the σ of a timestep grid is DDIM on that
#   grid (Karras et al. §3). The σ's to step through: those of II.7's grid, or Karras et al.'s σ_i =
#   (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (eq. 5, ρ = 7; WebUI's "Karras"), then 0.
#   Buys: WebUI's samplers by name on any DDPM checkpoint, ε, v or x0 (a flow model takes II.10's
#   Euler); README, "Samplers", says which to use and why Karras σ speckles here.
#   Needs: I.2, `import math`. Drive it with II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

def sigma_table(scheduler):
    """σ_t = √((1−ᾱ_t)/ᾱ_t) [T], increasing in t."""
    return scheduler.sqrt_one_minus_alpha_bar / scheduler.sqrt_alpha_bar


def nearest_timestep(scheduler, sigma):
    """The t whose σ_t is nearest to σ in log σ."""
    return (sigma_table(scheduler).log() - math.log(sigma)).abs().argmin().item()


def karras_sigmas(steps, sigma_min, sigma_max, rho=7.0):
    """σ_max = σ_0 > … > σ_{n−1} = σ_min, evenly spaced in σ^{1/ρ} (Karras et al., eq. 5)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)             # i/(n−1)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).tolist()


def karras_timesteps(scheduler, steps, start_t, sigma_min):
    """Karras σ's from σ_{start_t} down to sigma_min, each moved to its nearest timestep."""
    sigma_max = sigma_table(scheduler)[start_t].item()
    ladder = karras_sigmas(steps, min(sigma_min, sigma_max), sigma_max)
    timesteps = [nearest_timestep(scheduler, sigma) for sigma in ladder]
    return list(dict.fromkeys(timesteps))                               # duplicates once


def sigma_schedule(scheduler, timesteps):
    """The σ's a σ sampler steps through: σ_t of each timestep, high noise first, then 0."""
    sigmas = sigma_table(scheduler)
    return [sigmas[t].item() for t in timesteps] + [0.0]


class SigmaDenoiser:
    """D(x; σ) = x − σ·ε_θ(x_t, t_σ) from a Denoiser's ε_θ, with x_t = x/√(σ²+1) = √ᾱ·x;
    clamped to [−1, 1] like II.6's x0 if clip_x0."""

    def __init__(self, denoise, scheduler, clip_x0=True):
        self.denoise, self.scheduler, self.clip_x0 = denoise, scheduler, clip_x0

    def __call__(self, x, sigma):
        t = nearest_timestep(self.scheduler, sigma)
        pred_noise = self.denoise(x / math.sqrt(sigma**2 + 1), t)       # ε_θ(x_t, t)
        denoised = x - sigma * pred_noise                               # D(x; σ)
        return denoised.clamp(-1, 1) if self.clip_x0 else denoised


def to_d(x, sigma, denoised):
    """The ODE's slope dx/dσ = (x − D(x; σ))/σ: the noise ε̂ that D takes out of x."""
    return (x - denoised) / sigma


# Each σ sampler takes x_t at sigmas[0] (DDPM's scale), steps in x = x_t·√(σ²+1), and yields
# x_t = x/√(σ²+1) after each step, so it drops into generate() beside DDIM.

def euler_sigma_sampler(denoiser, x, sigmas):
    """Euler on dx/dσ (EDM Algorithm 1 without the correction): one evaluation a step."""
    x = x * math.sqrt(sigmas[0]**2 + 1)                                 # x = x_t·√(σ²+1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = to_d(x, sigma, denoiser(x, sigma))                          # dx/dσ at σ
        x = x + (sigma_next - sigma) * d
        yield x / math.sqrt(sigma_next**2 + 1)                          # x_t at σ_next


def ancestral_step(sigma, sigma_next, eta=1.0):
    """σ_down, σ_up: a deterministic step down to σ_down, then fresh noise of σ_up brings the
    noise level to σ_next (σ_down² + σ_up² = σ_next²); η = 1 adds DDPM's posterior variance β̃_t,
    0 none."""
    sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    sigma_up = min(sigma_next, sigma_up)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def euler_ancestral_sampler(denoiser, x, sigmas, eta=1.0, generator=None):
    """Euler ancestral (k-diffusion's sample_euler_ancestral, WebUI's "Euler a")."""
    x = x * math.sqrt(sigmas[0]**2 + 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = to_d(x, sigma, denoiser(x, sigma))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * d                                # Euler down to σ_down
        x = x + sigma_up * gaussian_like(x, generator)                  # fresh noise up to σ_next
        yield x / math.sqrt(sigma_next**2 + 1)


def heun_steps(evaluations):
    """Heun's steps within a budget of network evaluations: two a step, one on the last (to
    σ = 0), so n evaluations buy (n + 1) // 2 steps, which spend 2·steps − 1 of them."""
    return (evaluations + 1) // 2


def heun_sampler(denoiser, x, sigmas):
    """Heun's method (EDM Algorithm 1): two evaluations a step, plain Euler on the last."""
    x = x * math.sqrt(sigmas[0]**2 + 1)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = to_d(x, sigma, denoiser(x, sigma))
        x_euler = x + (sigma_next - sigma) * d                          # Euler's prediction
        if sigma_next == 0:
            x = x_euler                                                 # σ = 0 has no slope
        else:  # the trapezoid: the mean of the slopes at both ends, second order
            d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next))
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        yield x / math.sqrt(sigma_next**2 + 1)


def dpmpp_2m_sampler(denoiser, x, sigmas):
    """DPM-Solver++(2M) in σ (k-diffusion's sample_dpmpp_2m): II.8 with λ = −log σ."""
    x = x * math.sqrt(sigmas[0]**2 + 1)
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised                                                # σ = 0: the data itself
        else:
            h = math.log(sigma / sigma_next)                            # h = λ_next − λ
            denoised_d = denoised
            if old_denoised is not None:  # second order: D extrapolated, r = h_last/h
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
            old_denoised, h_last = denoised, h
        yield x / math.sqrt(sigma_next**2 + 1)


def dpmpp_2m_sde_sampler(denoiser, x, sigmas, eta=1.0, generator=None):
    """DPM-Solver++(2M) SDE (k-diffusion's sample_dpmpp_2m_sde, midpoint): each step keeps
    e^{−ηh} of the noise and replaces the rest with fresh noise; η = 0 is dpmpp_2m_sampler."""
    x = x * math.sqrt(sigmas[0]**2 + 1)
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            eta_h = eta * h
            # 1. the first-order step, with only e^{−ηh} of x's noise carried along
            x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            # 2. second order: the change of D since the last step, r = h_last/h
            if old_denoised is not None:
                r = h_last / h
                x = x - 0.5 * math.expm1(-h - eta_h) / r * (denoised - old_denoised)
            # 3. fresh noise of standard deviation σ_next·√(1 − e^{−2ηh})
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * gaussian_like(x, generator)
            old_denoised, h_last = denoised, h
        yield x / math.sqrt(sigma_next**2 + 1)


# ---------------------------------------------------------------------------------------------
# II.14 The cosine schedule (Nichol & Dhariwal 2021)
#   Replaces: I.2's linear β.
#   Idea: the linear β destroys the image early: its ᾱ_t falls below 0.1 at t = 475, and below 0.011
#   from t = 666 on: the last third of the steps are near-pure noise. ᾱ(τ) = f(τ)/f(0), f(τ) =
#   cos²((τ/T + s)/(1 + s)·π/2) for τ = 0 … T (their eq. 17), falls evenly instead; s = 0.008 keeps
#   β_0 from being tiny. Their 1-based step τ is this file's t + 1, so the table holds ᾱ_t = ᾱ(t +
#   1) and β_t = 1 − ᾱ(t + 1)/ᾱ(t); the β of the last step, where ᾱ(T) = 0, would be 1, so each β is
#   clipped at 0.999 (their §3.2): the reverse step's 1/√α_t stays finite.
#   Buys: docs/experiments.md (README, "Samplers", points there).
#   Needs: I.1, I.2, II.0, `from dataclasses import dataclass`, `import math`.
# ---------------------------------------------------------------------------------------------

def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """β_t, t = 0 … T−1, of the cosine schedule, in float64."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps    # τ/T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]                                                # ᾱ(τ) = f(τ)/f(0)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)    # β_t = 1 − ᾱ(t+1)/ᾱ(t)


def scheduler_for(config):
    """I.2's NoiseScheduler with the config's schedule: linear β, or cosine."""
    betas = cosine_betas(config.num_timesteps) if config.schedule == "cosine" else None
    return NoiseScheduler(config.num_timesteps, config.beta_start, config.beta_end, betas)


# ---------------------------------------------------------------------------------------------
# II.15 A UNet (Ronneberger et al. 2015), the denoiser of Ho et al. 2020 and Stable Diffusion
#   Replaces: I.3's DiT, with the same call model(x_t, t, labels) (`train --arch unet`).
#   Idea: convolutions see every pixel at full resolution; a down path halves the picture twice (28
#   → 14 → 7) and an up path doubles it back, each level joined to its mirror by a skip connection,
#   so the fine detail of the way down reaches the way up. Each residual block takes the timestep as
#   a scale and shift of its normalised features (the adaGN of Dhariwal & Nichol 2021: like adaLN in
#   the DiT, t can gate every channel, where an added embedding can only shift it). At 14 and 7,
#   self-attention over the positions, then cross-attention from the pixels (Q) to the label's
#   tokens and the timestep token (K, V), as SD's CrossAttnDownBlock2D; the label embedding has the
#   ∅ row, and the last conv starts at 0.
#   Buys: README, "A UNet and latent diffusion".
#   Needs: I.1, I.3, II.0, `from dataclasses import dataclass`, `import math`,
#   `import torch.nn as nn`, `import torch.nn.functional as F`.
# ---------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, then the timestep as (1 + scale)·h + shift, → SiLU → conv, plus
    the input (through a 1×1 conv where the width changes)."""

    def __init__(self, c_in, c_out, time_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, 2 * c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))                            # [B, C_out, H, W]
        scale, shift = self.time(time_emb)[:, :, None, None].chunk(2, dim=1)  # [B, C_out, 1, 1]
        h = self.norm2(h) * (1 + scale) + shift                          # adaGN: t per channel
        return self.skip(x) + self.conv2(F.silu(h))                      # [B, C_out, H, W]


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions, then (conditional) cross-attention to the
    condition tokens, each residual: SD's Transformer2DModel without its MLP."""

    def __init__(self, channels, heads, token_dim, cross_attention):
        super().__init__()
        self.norm_self, self.self_attn = layer_norm(channels), Attention(channels, heads)
        self.cross_attn = Attention(channels, heads) if cross_attention else None
        self.norm_cross = layer_norm(channels) if cross_attention else None
        self.context = nn.Linear(token_dim, channels) if cross_attention else None

    def forward(self, x, cond_tokens=None):
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)                            # [B, H·W, C]
        h = self.norm_self(tokens)
        tokens = tokens + self.self_attn(h, h)                           # pixel ↔ pixel
        if self.cross_attn is not None:                                  # Q pixels, KV cond
            tokens = tokens + self.cross_attn(self.norm_cross(tokens), self.context(cond_tokens))
        return tokens.transpose(1, 2).reshape(B, C, H, W)                # [B, C, H, W]


class UNetLevel(nn.Module):
    """One level of the UNet: a ResBlock, then (below the top) an AttentionBlock."""

    def __init__(self, c_in, c_out, config, attend):
        super().__init__()
        self.res = ResBlock(c_in, c_out, config.width)
        self.attn = AttentionBlock(c_out, config.heads, config.width, config.cond) if attend \
            else None

    def forward(self, h, time_emb, cond_tokens):
        h = self.res(h, time_emb)
        return h if self.attn is None else self.attn(h, cond_tokens)


class UNet(nn.Module):
    """ε_θ(x_t, t, c) as a UNet: levels of width c, 2c, 2c at S, S/2, S/4 (S = image_size)."""

    condition_tokens = DiT.condition_tokens  # the label's tokens and the timestep token

    def __init__(self, config):
        super().__init__()
        c, D = config.unet_channels, config.width
        self.config = config
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        if config.cond:  # K + 1 rows (∅ last), `label_tokens` tokens each, as the DiT's
            self.label_embed = nn.Embedding(config.num_classes + 1, config.label_tokens * D)
        self.stem = nn.Conv2d(config.channels, c, 3, padding=1)
        self.down = nn.ModuleList([UNetLevel(c, c, config, False),            # S
                                   UNetLevel(c, 2 * c, config, True),         # S/2
                                   UNetLevel(2 * c, 2 * c, config, True)])    # S/4
        self.downsample = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in (c, 2 * c))
        self.mid = UNetLevel(2 * c, 2 * c, config, True)
        self.up = nn.ModuleList([UNetLevel(4 * c, 2 * c, config, True),       # [h; skip] in
                                 UNetLevel(4 * c, 2 * c, config, True),
                                 UNetLevel(3 * c, c, config, False)])
        self.upsample = nn.ModuleList(nn.Conv2d(2 * c, 2 * c, 3, padding=1) for _ in range(2))
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(),
                                 nn.Conv2d(c, config.channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # the output starts at 0, as the DiT's does
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x_t, t, labels=None):
        # x_t: [B, C, S, S]; t: [B]; labels: [B], ∅ = −1
        time_emb = self.time_mlp(timestep_embedding(t, self.config.width))  # [B, D]
        cond = self.condition_tokens(labels, time_emb) if self.config.cond else None
        h, skips = self.stem(x_t), []                                    # [B, c, S, S]

        # down: each level's output is kept for its mirror, then halved
        for k, level in enumerate(self.down):
            h = level(h, time_emb, cond)
            skips.append(h)
            if k < len(self.downsample):
                h = self.downsample[k](h)                                # [B, w, S/2ᵏ⁺¹, ·]

        # middle, at S/4
        h = self.mid(h, time_emb, cond)                                  # [B, 2c, S/4, S/4]

        # up: the mirror's output joined on, then doubled
        for k, level in enumerate(self.up):
            h = level(torch.cat([h, skips.pop()], dim=1), time_emb, cond)
            if k < len(self.upsample):
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)                                               # [B, C, S, S]


# ---------------------------------------------------------------------------------------------
# II.16 Latent diffusion (Rombach et al. 2022): diffusion in a small VAE's latent space
#   Replaces: the pixels as x0 (`train --latent`).
#   Idea: a variational autoencoder (Kingma & Welling 2014) is trained first, alone: its encoder
#   maps a picture to the mean μ and log-variance ℓ of a latent z (S/2 × S/2 × 2 by default), its
#   decoder maps z back; the loss is the reconstruction error plus a small weight on KL(N(μ, e^ℓ) ‖
#   N(0, I)), which keeps the latents near N(0, I). It is then frozen; the denoiser learns the
#   latents z = k·μ(x), with k the scale that gives them unit variance on the training data (SD's
#   scaling factor, 0.18215 for its VAE), and a sample is decode(z/k).
#   Buys: README, "A UNet and latent diffusion".
#   Needs: I.1, I.2, I.3, I.4, I.5, II.9, `from dataclasses import dataclass`, `import math`,
#   `import torch.nn as nn`, `import torch.nn.functional as F`.
# ---------------------------------------------------------------------------------------------

class VAE(nn.Module):
    """A convolutional autoencoder with a Gaussian latent: [B, C, S, S] ↔ [B, L, S/f, S/f]."""

    def __init__(self, channels, latent_channels, factor, width=32):
        super().__init__()
        halvings = int(math.log2(factor))
        down = [nn.Conv2d(width, width, 4, stride=2, padding=1) for _ in range(halvings)]
        up = [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1) for _ in range(halvings)]
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
                                     *[m for conv in down for m in (conv, nn.SiLU())],
                                     nn.Conv2d(width, 2 * latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
                                     *[m for conv in up for m in (conv, nn.SiLU())],
                                     nn.Conv2d(width, channels, 3, padding=1))

    def encode(self, x):
        """μ and the log-variance ℓ of q(z | x) = N(μ, e^ℓ), each [B, L, S/f, S/f]."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var.clamp(-30, 20)

    def decode(self, z):
        return self.decoder(z)                                          # [B, C, S, S]


def reparameterise(mean, log_var, generator=None):
    """z = μ + e^{ℓ/2}·ε, ε ~ N(0, I): a draw of q(z | x) that gradients pass (their §2.4)."""
    noise = torch.randn(mean.shape, device=mean.device, generator=generator)
    return mean + (0.5 * log_var).exp() * noise


def kl_to_standard_normal(mean, log_var):
    """KL(N(μ, e^ℓ) ‖ N(0, I)) of each image [B]: ½·Σ(μ² + e^ℓ − 1 − ℓ) (their App. B)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).flatten(1).sum(1)


def vae_loss(vae, x, kl_weight=1e-4, generator=None):
    """The mean squared reconstruction error of each image, plus kl_weight × its KL per pixel:
    [B]."""
    mean, log_var = vae.encode(x)
    reconstruction = vae.decode(reparameterise(mean, log_var, generator))
    error = (reconstruction - x).pow(2).mean(dim=(1, 2, 3))
    return error + kl_weight * kl_to_standard_normal(mean, log_var) / x[0].numel()


def train_vae(vae, images, epochs=2, progress=None):
    """Stage one: the VAE fitted alone on uint8 images [N, C, S, S] by II.9's fit_network."""
    return fit_network(vae, lambda net, x, _: vae_loss(net, x).mean(), images, images, epochs,
                       progress)


@torch.no_grad()
def latent_scale(vae, images, count=10_000):
    """k = 1/std of the latent means μ(x) of the first `count` images: unit-variance latents."""
    means = torch.cat([vae.encode(as_x0(images[i:i + 1000]))[0]
                       for i in range(0, min(len(images), count), 1000)])
    return 1 / means.std().item()


class LatentDiffusion(nn.Module):
    """A denoiser of the VAE's scaled latents: the same call network(z_t, t, labels), with
    encode(x) = k·μ(x) and decode(z) = the decoder's picture of z/k. The VAE stays frozen."""

    def __init__(self, network, vae, scale):
        super().__init__()
        self.network, self.vae = network, vae.requires_grad_(False)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.config = network.config

    def forward(self, z_t, t, labels=None):
        return self.network(z_t, t, labels)

    def encode(self, x):
        return self.vae.encode(x)[0] * self.scale                       # z = k·μ(x)

    def decode(self, z):
        return self.vae.decode(z / self.scale).clamp(-1, 1)             # x = decoder(z/k)


# ---------------------------------------------------------------------------------------------
# II.17 Reflow (Liu et al. 2022, "Flow Straight and Fast", §2.3): a flow of few steps
#   Replaces: II.10's independent pairs (x0, ε) by coupled ones (`train --reflow-from`).
#   Idea: II.10 joins every image to every noise, so straight lines cross; where they cross, the one
#   velocity the network can learn at a point is the average of the lines through it, and the paths
#   it integrates bend, which is why one Euler step from noise lands on a blurred average. Run the
#   trained flow from noise z to its image x = ODE(z): these couplings come from an ODE, whose paths
#   never cross, so a new flow trained on the lines from z to x (the same loss, the noise now given)
#   has nothing to average, and its paths are nearly straight: one or two Euler steps suffice
#   (InstaFlow, Liu et al. 2024, did this to Stable Diffusion). The straightness S = E_s‖(z − x) −
#   v(x_s, s)‖² along the path (their eq. 4) is 0 for straight paths.
#   Buys: README, "One step: reflow".
#   Needs: I.1, I.2, I.5, II.10, `from dataclasses import dataclass`. Its denoise(x, t) → v_θ may be
#   II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def coupled_pairs(denoise, noise, steps, num_timesteps):
    """The flow's image x = ODE(z) of each noise z by Euler steps from s = 1 to 0, and the
    straightness of its path: mean over the steps of ‖(z − x) − v_θ(x_s, s)‖² [B]."""
    velocities = []
    record = lambda x, t: velocities.append(denoise(x, t)) or velocities[-1]
    s_grid = flow_grid(steps)
    x = noise
    for x in euler_sampler(record, noise, s_grid, num_timesteps):
        pass                                                            # x = x_0, the image
    chord = noise - x                                                   # z − x: the straight line
    gaps = torch.stack([(chord - v).pow(2).mean(dim=(1, 2, 3)) for v in velocities])
    return x, gaps.mean(0)                                              # [B, C, H, W], [B]


# ---------------------------------------------------------------------------------------------
# II.18 Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2): one step
#   Replaces: the 15 evaluations of II.8's or II.13's ODE solvers by one, two or four
#   (`train --distill-from`).
#   Idea: the probability-flow ODE carries each x_t along one path to one image; a consistency
#   function f(x_t, t) returns that image from any point of the path, so one evaluation at
#   t = T−1 draws a sample. It is pinned down by self-consistency, f(x_t, t) = f(x_t', t') for two
#   points of one path, and the boundary f(x, 0) = x. To learn it, noise a real image to x_t at a
#   t = t_{n+1} of a grid 0 = t_0 < … < t_N = T−1 (Karras σ's, II.13), let one DDIM step (II.7)
#   of the guided teacher carry it to x̂ at t_n on nearly the same path, and pull f_θ(x_t, t)
#   towards f_θ(x̂, t_n) in squared distance, the target held without gradient (Song & Dhariwal
#   2023 drop its EMA); at n = 0 the target is x̂ itself, the boundary, which anchors the rest.
#   The student is the teacher's network, started from its weights and read as an image: for a
#   v-network f = √ᾱ_t·x_t − √(1−ᾱ_t)·v_θ, Song et al.'s c_skip·x + c_out·F with c_skip = √ᾱ_t.
#   Sampling (their Algorithm 1): x0 = f(x_{T−1}, T−1); each further step noises x0 back to a
#   smaller t and applies f again.
#   Buys: one evaluation draws a sharp digit where the teacher's one step is a blur (99.8% right,
#   excess 32.5 at 10,000 samples), still 17× the default's 15 (README, "One step").
#   Needs: I.1, I.2, I.5, II.0, II.2, II.5, II.6, II.7, II.13, `import copy`,
#   `from dataclasses import dataclass`, `import math`. Drive it with II.5's Denoiser.
# ---------------------------------------------------------------------------------------------

def consistency_grid(scheduler, steps):
    """The distillation grid 0 = t_0 < … < t_N = T−1: `steps` + 1 Karras σ's (II.13, ρ = 7)
    from σ_{T−1} down to σ_0, each moved to its nearest timestep."""
    sigma_0 = sigma_table(scheduler)[0].item()
    return karras_timesteps(scheduler, steps + 1, scheduler.num_timesteps - 1, sigma_0)[::-1]


def consistency_function(model, scheduler, prediction, x_t, t, labels=None):
    """f_θ(x_t, t): the image the network's output implies, √ᾱ_t·x_t − √(1−ᾱ_t)·v_θ for a v-network
    (an x0-network's output as it is). t: [B]."""
    output = model(x_t, t, labels)
    if prediction == "x0":
        return output
    sqrt_alpha_bar = per_sample(scheduler.sqrt_alpha_bar, t, x_t)
    sqrt_one_minus_alpha_bar = per_sample(scheduler.sqrt_one_minus_alpha_bar, t, x_t)
    return sqrt_alpha_bar * x_t - sqrt_one_minus_alpha_bar * output


def consistency_loss(student, teacher, scheduler, config, x0, labels, grid, generator=None):
    """Algorithm 2's loss on a batch at one step of the grid: each image's squared distance
    ‖f_θ(x_t, t) − sg f_θ(x̂, t_n)‖², averaged over its pixels [B], and t/T [B].
    teacher(x, t, labels) → the guided ε."""
    B, device = x0.shape[0], x0.device
    n = torch.randint(0, len(grid) - 1, (), device=device, generator=generator).item()
    t, t_prev = grid[n + 1], grid[n]
    t_batch, t_prev_batch = (torch.full((B,), k, device=device) for k in (t, t_prev))  # [B]
    noise = torch.randn(x0.shape, device=device, generator=generator)
    x_t, _ = scheduler.noise_image(x0, t, noise)                         # x_{t_{n+1}}
    with torch.no_grad():
        pred_noise = teacher(x_t, t, labels)                             # the teacher's ε
        x_prev = ddim_step(scheduler, x_t, t, t_prev, pred_noise, clip_x0=config.clip_x0)
        target = x_prev if t_prev == 0 else consistency_function(
            student, scheduler, config.prediction, x_prev, t_prev_batch, labels)  # sg f_θ(x̂)
    pred = consistency_function(student, scheduler, config.prediction, x_t, t_batch, labels)
    distance = (pred - target).pow(2).mean(dim=(1, 2, 3))                # ‖f − sg f‖² / pixels
    return distance, t_batch.float() / config.num_timesteps


def guided_teacher(model, scheduler, config, guide=None):
    """A trained checkpoint as teacher(x, t, labels) → its guided ε: II.5's Denoiser with the
    checkpoint's own guidance."""
    w = config.guidance_scale if config.cond else config.autoguidance_scale
    interval = (config.guidance_low, config.guidance_high)
    return lambda x, t, labels: Denoiser(model, scheduler, config, labels, w, None, interval,
                                         guide)(x, t)


def consistency_sampler(denoise, scheduler, x, timesteps, clip_x0=True, generator=None):
    """Multistep consistency sampling (Algorithm 1) on the given timesteps, high first: f at the
    first, then, at each next t, x0 noised back to x_t with fresh noise and f again. f(x, t) is
    II.6's x0 of denoise(x, t): for a consistency model, the same f as consistency_function's."""
    for k, t in enumerate(timesteps):
        if k > 0:
            x, _ = scheduler.noise_image(x, t, gaussian_like(x, generator))  # x_t from x0
        x = predict_x0(scheduler, x, t, denoise(x, t))                   # f(x_t, t)
        if clip_x0:
            x = x.clamp(-1, 1)
        yield x                                                         # x0


# =============================================================================================
# Part III — the tool. The lecture has ended: what follows is the program around it (the
#   training run, checkpoints, sampling by name, evaluation, the command line). It teaches no
#   new formula; it calls those of Parts I and II.
# =============================================================================================

# ---------------------------------------------------------------------------------------------
# III.1 Messages and pictures: the user's mistakes as one line, images in and out
# ---------------------------------------------------------------------------------------------

class UserError(Exception):
    """A mistake the user can fix; the command line prints it as one line and exits with 1."""


def first_line(error):
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"


def format_seconds(seconds):
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


class Clock:
    """Progress of a loop of `total` steps: a line is due every few seconds and at the end,
    and each line ends with the ETA."""

    def __init__(self, total, first=0, every=5.0):
        self.total, self.first, self.every = total, first, every
        self.started = self.last = time.time()

    def due(self, done):
        return done >= self.total or time.time() - self.last >= self.every

    def rate(self, done):
        """Steps per second since the start."""
        return (done - self.first) / max(time.time() - self.started, 1e-9)

    def say(self, done, text):
        eta = (self.total - done) / max(self.rate(done), 1e-9)
        print(f"{text}  ETA {format_seconds(eta)}", flush=True)
        self.last = time.time()


def progress_line(name):
    """A progress(step, steps, loss) for II.9's fit_network: a line every few seconds, ETA."""
    clock = None

    def progress(step, steps, loss):
        nonlocal clock
        clock = clock or Clock(steps, step - 1)
        if clock.due(step):
            clock.say(step, f"  {name} step {step}/{steps}  loss {loss.item():.4f}")
    return progress


def to_pixels(x):
    """[−1, 1] → [0, 1] for saving: (x + 1) / 2, clamped; never min-max normalised (that
    hides range bugs)."""
    return ((x + 1) / 2).clamp(0, 1)


def as_picture(images, nrow, scale=2, pad_value=1):
    """Images [B, C, H, W] (uint8, or in [−1, 1]) as an RGB grid picture (torchvision's
    make_grid, rounded as its save_image rounds), every pixel scale × scale."""
    from PIL import Image
    from torchvision.utils import make_grid
    grid = make_grid(to_pixels(as_x0(images).float().cpu()), nrow=nrow, pad_value=pad_value)
    pixels = (grid.permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).byte().numpy()
    picture = Image.fromarray(pixels, mode="RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_grid(images, path, nrow):
    """Images as one grid picture on black, as torchvision's save_image draws it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    as_picture(images, nrow, scale=1, pad_value=0).save(path)


def spread(items, count):
    """At most `count` items, evenly spread from the first to the last."""
    keep = torch.linspace(0, len(items) - 1, min(count, len(items))).round().long().unique()
    return [items[k] for k in keep.tolist()]


def save_gif(pictures, path, duration=80):
    """PIL pictures as an animated GIF, the last one held a second."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    held = pictures[1:] + [pictures[-1]] * 10
    pictures[0].save(path, save_all=True, append_images=held, duration=duration, loop=0)


# ---------------------------------------------------------------------------------------------
# III.2 Data: MNIST, torchvision's other data sets, or a folder of your own pictures. Every set
#     is decoded once into one uint8 tensor [N, C, S, S] (a quarter of float32's memory) and
#     turned into x0 ∈ [−1, 1] a batch at a time; the run's Config records which set it was.
# ---------------------------------------------------------------------------------------------

# torchvision's data sets by the name --data takes, with the folder each keeps under --data-dir
DATASETS = {"mnist": ("MNIST", "MNIST/raw"), "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw"),
            "cifar10": ("CIFAR10", "cifar-10-batches-py")}


@dataclass
class Images:
    pixels: torch.Tensor            # [N, C, S, S] uint8 (II.17's pairs: their float images)
    labels: torch.Tensor            # [N] class indices (all 0 for a folder without classes)
    class_names: tuple              # () for MNIST, none for a folder without subfolders
    noise: torch.Tensor = None      # II.17: the noise each image was drawn from

    def __len__(self):
        return len(self.pixels)

    def take(self, batch):
        """The pixels, labels and noise (or None) of the images at the indices `batch`."""
        return (self.pixels[batch], self.labels[batch],
                None if self.noise is None else self.noise[batch])

    def to(self, device):
        moved = [None if x is None else x.to(device) for x in (self.pixels, self.labels,
                                                                self.noise)]
        return Images(moved[0], moved[1], self.class_names, moved[2])


def label_names(config):
    """The name of every class of a conditional model: MNIST's digits, or the recorded names."""
    return list(config.class_names) or [str(k) for k in range(config.num_classes)]


def resized(pixels, size):
    """[N, C, H, W] uint8 with the shorter side resized to `size` (antialiased), then
    centre-cropped to size × size: torchvision's Resize and CenterCrop."""
    from torchvision.transforms.v2 import functional as TF
    if pixels.shape[-2:] == (size, size):
        return pixels
    return TF.center_crop(TF.resize(pixels, size, antialias=True), size)


@dataclass
class DataSet:
    """A data set found and measured but not decoded yet: decode() → Images [N, C, S, S]."""
    data: str                       # as the Config records it
    channels: int
    size: int
    class_names: tuple
    count: int
    decode: object                  # () → Images

    @property
    def num_classes(self):
        """MNIST's ten digits, the named classes, or one for a folder without subfolders."""
        return len(self.class_names) or (NUM_CLASSES if self.data == "mnist" else 1)


def torchvision_set(name, data_dir, train, image_size):
    """MNIST, Fashion-MNIST or CIFAR-10 from --data-dir by I.4's load_dataset, downloaded there
    if missing."""
    kind, folder = DATASETS[name]
    try:
        pixels, labels, classes = load_dataset(data_dir, train, kind)
    except Exception as error:  # no network, a proxy, a half-written file: say where we looked
        where = os.path.join(data_dir, *folder.split("/"))
        raise UserError(f"{kind} is not in {where} and could not be downloaded "
                        f"({first_line(error)}); pass --data-dir pointing at a folder that "
                        f"holds {folder}") from None
    size = image_size or pixels.shape[-1]
    names = () if name == "mnist" else classes
    images = lambda: Images(resized(pixels, size), labels, names)
    return DataSet(name, pixels.shape[1], size, names, len(pixels), images)


def folder_samples(folder):
    """(path, label) of every picture under `folder` (any format PIL opens; other files are
    ignored), and the class names: its subfolders, sorted as torchvision's ImageFolder sorts
    them, or () if the pictures lie in the folder itself (an unconditional set)."""
    from PIL import Image
    from torchvision.datasets.folder import find_classes, make_dataset
    Image.init()
    extensions = tuple(Image.registered_extensions())
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        files = sorted(entry.path for entry in os.scandir(folder)
                       if entry.name.lower().endswith(extensions))
        return [(path, 0) for path in files], ()
    classes, class_to_index = find_classes(folder)
    samples = make_dataset(folder, class_to_index, extensions=extensions, allow_empty=True)
    counts = torch.bincount(torch.tensor([label for _, label in samples], dtype=torch.long),
                            minlength=len(classes))
    empty = [name for name, count in zip(classes, counts.tolist()) if count == 0]
    if empty:
        raise UserError(f"--data {folder}: the class folder {empty[0]} holds no pictures (every "
                        f"subfolder is a class); fill it or move it out")
    return samples, tuple(classes)


def read_header(path):
    """A picture's mode and size, from its header only; a file PIL cannot read is named."""
    from PIL import Image
    try:
        with Image.open(path) as picture:
            return picture.mode, picture.size
    except Exception as error:
        raise UserError(f"cannot read {path} as a picture ({first_line(error)}); "
                        f"delete or repair it (no picture is skipped silently)") from None


def picture_to_pixels(picture, channels, size):
    """A PIL picture as uint8 [C, S, S]: grey or RGB, shorter side to S, centre-cropped."""
    from torchvision.transforms.functional import pil_to_tensor
    picture = picture.convert("L" if channels == 1 else "RGB")
    return resized(pil_to_tensor(picture)[None], size)[0]


def available_memory():
    """Bytes of memory free for new data (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def folder_set(folder, image_size, channels=None):
    """Every picture under `folder`, found and measured from its header. Grey if every picture
    is single-channel, RGB otherwise (or `channels`); image_size None: the smallest picture's
    shorter side, at most 64 (a DiT on a CPU pays for every token; --image-size for more)."""
    samples, names = folder_samples(folder)
    if not samples:
        raise UserError(f"--data {folder}: no pictures found in it or its subfolders")
    headers = [read_header(path) for path, _ in samples]
    grey = all(mode in ("1", "L", "LA", "I", "I;16", "F") for mode, _ in headers)
    channels = channels or (1 if grey else 3)
    size = image_size or min(64, min(min(shape) for _, shape in headers))
    decode = lambda: decode_folder(folder, samples, names, channels, size)
    return DataSet(os.path.abspath(folder), channels, size, names, len(samples), decode)


def decode_folder(folder, samples, names, channels, size):
    """The pictures decoded into one uint8 tensor, with progress; a file that cannot be decoded
    is named (a truncated one fails only here)."""
    from PIL import Image
    need, free = len(samples) * channels * size * size, available_memory()
    if free is not None and need > free:
        raise UserError(f"--data {folder}: {len(samples):,} pictures at {channels}×{size}×{size} "
                        f"take {need / 2**30:.1f} GiB, but {free / 2**30:.1f} GiB are free; "
                        f"pass a smaller --image-size")
    print(f"decoding {len(samples):,} pictures from {folder} into {channels}×{size}×{size} "
          f"({need / 2**20:,.1f} MB as uint8)", flush=True)
    pixels = torch.empty(len(samples), channels, size, size, dtype=torch.uint8)
    clock = Clock(len(samples))
    for i, (path, _) in enumerate(samples):
        try:
            with Image.open(path) as picture:
                pixels[i] = picture_to_pixels(picture, channels, size)
        except Exception as error:
            raise UserError(f"cannot decode {path} ({first_line(error)}); delete or repair it "
                            f"(no picture is skipped silently)") from None
        if clock.due(i + 1) and len(samples) >= 1000:
            clock.say(i + 1, f"  decoded {i + 1:,}/{len(samples):,}")
    return Images(pixels, torch.tensor([label for _, label in samples]), names)


def find_data(data, data_dir="data", train=True, image_size=None, channels=None):
    """The DataSet --data names: one of DATASETS, or a folder (which has no test split: its
    train=False is the folder again)."""
    if data in DATASETS:
        return torchvision_set(data, data_dir, train, image_size)
    if os.path.isdir(data):
        return folder_set(data, image_size, channels)
    raise UserError(f"--data {data}: not a folder, nor one of {', '.join(DATASETS)}")


def checked_data(config, data=None, data_dir="data", train=True):
    """The DataSet a checkpoint's model was made for (its recorded data, or --data), at its
    size and channels; a set of other channels or another class count is refused."""
    found = find_data(data or config.data, data_dir, train, config.image_size, config.channels)
    if found.channels != config.channels or found.num_classes != config.num_classes:
        raise UserError(f"--data {found.data}: pictures of {found.channels} channel(s) and "
                        f"{found.num_classes} classes, but the model was made for "
                        f"{config.channels} and {config.num_classes}")
    return found


# ---------------------------------------------------------------------------------------------
# III.3 Sampling by name: the samplers of Parts I and II behind one function, generate()
# ---------------------------------------------------------------------------------------------

def clean_guess(scheduler, config, x_t, t, output):
    """The clean image an ε (or, for a flow model, a velocity) implies, clamped to [−1, 1]
    (a latent, II.16, is not): II.6's predict_x0, or x0 = x_s − s·v on II.10's line."""
    if config.objective == "flow":
        guess = x_t - t / (config.num_timesteps - 1) * output
    else:
        guess = predict_x0(scheduler, x_t, t, output)
    return guess if config.latent else guess.clamp(-1, 1)


class RecordingDenoiser:
    """A Denoiser that also keeps, for `show`, (t, x_t, the clean image the step aims at)."""

    def __init__(self, denoise, scheduler, config, record):
        self.denoise, self.scheduler, self.config, self.record = denoise, scheduler, config, record

    def __call__(self, x, t):
        output = self.denoise(x, t)
        self.record.append((t, x, clean_guess(self.scheduler, self.config, x, t, output)))
        return output


SIGMA_SAMPLERS = ("euler", "euler-a", "heun", "dpm++2m", "dpm++2m-sde")   # II.13
# each name, and what Stable Diffusion WebUI calls it
SAMPLERS = {"vanilla": "Part I's DDPM loop, all T steps", "ddpm": "DDPM, all T steps",
            "ddim": "DDIM", "dpm": "DPM++ 2M on the timestep grid, in λ (II.8)",
            "euler": "Euler (flow models: Euler on the flow)", "euler-a": "Euler a",
            "heun": "Heun", "dpm++2m": "DPM++ 2M", "dpm++2m-sde": "DPM++ 2M SDE",
            **{f"{name}-karras": "the same on Karras σ" for name in SIGMA_SAMPLERS},
            "consistency": "a distilled model's consistency sampling (II.18)"}


@dataclass
class Sampling:
    """Every setting of a draw, in one place: the command line fills it, generate() reads it."""
    sampler: str = "dpm++2m-karras"  # a name of SAMPLERS
    steps: int = 15                 # network evaluations (Heun: at most this many)
    guidance_scale: float = 1.5     # CFG's w (autoguidance's, for an unconditional model)
    guidance_interval: tuple = None  # (low, high) of t/(T−1); None: the checkpoint's
    negative_labels: torch.Tensor = None
    guide: nn.Module = None         # autoguidance's weak model (II.5)
    eta: float = None               # fresh noise: DDIM's η (default 0), Euler a's and DPM++
                                    #   SDE's (default 1)
    classifier: nn.Module = None    # II.9's noisy classifier, and its scale s
    classifier_scale: float = 0.0
    init_images: torch.Tensor = None  # image-to-image (II.12) from this picture
    strength: float = 1.0           #   noised to t = strength·(T−1); 1: from pure noise
    sigma_min: float = 0.2          # the smallest σ of Karras σ's (t = 57). WebUI takes the
                                    #   table's σ_0 = 0.01, but log-SNR training (II.3) rarely
                                    #   drew so little noise, and the samples speckle (README)
    sde_noise: float = 0.0          # II.11 a of a flow model's SDE; 0: Euler
    variance: str = "beta"          # DDPM's std_t²: "beta" (β_t) or "posterior" (β̃_t)


def network_evaluations(sampler, steps):
    """How many network evaluations `steps` buys (Heun: II.13's heun_steps)."""
    if sampler.removesuffix("-karras") == "heun":
        return 2 * heun_steps(steps) - 1
    return steps


def sampler_timesteps(sampling, scheduler, start_t):
    """The timesteps a few-step sampler evaluates: II.7's grid, or Karras σ's, each moved to
    the nearest of the T timesteps."""
    name = sampling.sampler
    count = heun_steps(sampling.steps) if name.startswith("heun") else sampling.steps
    if not name.endswith("-karras"):
        return sampling_timesteps(start_t, count)
    return karras_timesteps(scheduler, count, start_t, sampling.sigma_min)


def sampler_loop(denoise, scheduler, config, x, sampling, start_t, generator=None,
                 mean_shift=None):
    """The loop of the named sampler (II.6–8, II.10, II.11, II.13), yielding x after every step."""
    name = sampling.sampler.removesuffix("-karras")
    if config.objective == "flow":
        s_grid = flow_grid(sampling.steps, sampling.strength)
        return flow_sde_sampler(denoise, x, s_grid, config.num_timesteps, sampling.sde_noise,
                                generator)
    if name == "ddpm":
        return ddpm_sampler(denoise, scheduler, x, start_t, generator, config.clip_x0,
                            mean_shift, sampling.variance)
    timesteps = sampler_timesteps(sampling, scheduler, start_t)
    if name == "consistency":
        return consistency_sampler(denoise, scheduler, x, timesteps, config.clip_x0, generator)
    if name == "ddim":
        return ddim_sampler(denoise, scheduler, x, timesteps, config.clip_x0,
                            sampling.eta or 0.0, generator)
    if name == "dpm":
        return dpm_solver_sampler(denoise, scheduler, x, timesteps, config.clip_x0)
    denoiser, sigmas = SigmaDenoiser(denoise, scheduler, config.clip_x0), sigma_schedule(
        scheduler, timesteps)
    eta = 1.0 if sampling.eta is None else sampling.eta
    if name == "euler":
        return euler_sigma_sampler(denoiser, x, sigmas)
    if name == "euler-a":
        return euler_ancestral_sampler(denoiser, x, sigmas, eta, generator)
    if name == "heun":
        return heun_sampler(denoiser, x, sigmas)
    if name == "dpm++2m":
        return dpmpp_2m_sampler(denoiser, x, sigmas)
    return dpmpp_2m_sde_sampler(denoiser, x, sigmas, eta, generator)


def sampler_and_steps(config, sampler=None, steps=None):
    """The sampler asked for (or the checkpoint's) and its steps (all T for the DDPM loops, else
    the checkpoint's), checked: which sampler fits which checkpoint, and how many steps."""
    flow = config.objective == "flow"
    sampler = sampler or ("euler" if flow else config.sampler)
    all_t = sampler in ("ddpm", "vanilla")
    if steps is None:
        steps = config.num_timesteps if all_t else config.sample_steps
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if flow and sampler != "euler":
        raise UserError(f"this checkpoint was trained with --objective flow; it samples with "
                        f"--sampler euler (with --sde-noise: the flow SDE), not {sampler}")
    if config.distill_from and sampler != "consistency":
        raise UserError(f"this checkpoint is a consistency model (train --distill-from); it "
                        f"samples with --sampler consistency, not {sampler}")
    if sampler == "consistency" and not config.distill_from:
        raise UserError("--sampler consistency needs a consistency model (train --distill-from "
                        "CKPT); this checkpoint is an ordinary diffusion model")
    if sampler == "vanilla" and config.prediction != "eps":
        raise UserError(f"--sampler vanilla (Part I's loop) needs a network that predicts ε; "
                        f"this one predicts {config.prediction}: use --sampler ddpm")
    if steps < 1 or (not flow and steps > config.num_timesteps):
        raise UserError(f"--steps must be between 1 and T = {config.num_timesteps}, got {steps}")
    if all_t and steps != config.num_timesteps:
        raise UserError(f"the {sampler} sampler takes all T = {config.num_timesteps} steps; use "
                        f"--sampler ddim for fewer")
    return sampler, steps


@torch.no_grad()
def generate(model, scheduler, config, labels, *, shape, generator=None, noise=None, frames=None,
             record=None, **settings):
    """Draw images of `labels` from noise (or from a noised init image): [B, C, H, W] in
    [−1, 1]; settings are the fields of Sampling. "vanilla" is Part I's loop as it stands; the
    others run through II.5's Denoiser. noise is x_{T−1} (drawn from the generator if None);
    frames, if a list, receives x after every step; record, if a list, (t, x_t, guess of x0)
    at every network evaluation."""
    sampling = Sampling(**settings)
    device = next(model.parameters()).device
    if sampling.sampler == "vanilla":  # it draws its own noise, and records nothing
        return sample_ddpm_cfg(model, scheduler, labels, sampling.guidance_scale, shape,
                               generator, device)
    denoise, mean_shift = guided_denoiser(model, scheduler, config, labels, sampling)
    if record is not None:
        denoise = RecordingDenoiser(denoise, scheduler, config, record)
    if noise is None:
        noise = gaussian_like(torch.empty(shape, device=device), generator)
    x = noise.to(device)                                                # x_{T−1} ~ N(0, I)
    view = model.decode if config.latent else (lambda z: z)  # II.16: a latent → its picture
    if sampling.init_images is not None:
        init = model.encode(sampling.init_images) if config.latent else sampling.init_images
        x = noised_start(scheduler, config, init, sampling.strength, x)
    start_t = round(sampling.strength * (config.num_timesteps - 1))
    for x in sampler_loop(denoise, scheduler, config, x, sampling, start_t, generator,
                          mean_shift):
        if frames is not None:
            frames.append(view(x))
    return view(x)


def guided_denoiser(model, scheduler, config, labels, sampling):
    """II.5's Denoiser with the guidance `sampling` asks for; and DDPM's mean shift of
    classifier guidance (the other samplers take it inside the denoiser), or None."""
    interval = sampling.guidance_interval or (config.guidance_low, config.guidance_high)
    classifier_guide = None
    if sampling.classifier is not None and sampling.classifier_scale != 0:
        classifier_guide = ClassifierGuide(sampling.classifier, scheduler, labels,
                                           sampling.classifier_scale, sampling.variance)
    ddpm = sampling.sampler == "ddpm"
    denoise = Denoiser(model, scheduler, config, labels if config.cond else None,
                       sampling.guidance_scale, sampling.negative_labels, interval,
                       sampling.guide, None if ddpm else classifier_guide)
    return denoise, classifier_guide.mean_shift if ddpm and classifier_guide else None


def default_guidance_scale(config):
    """CFG's w for a conditional model, autoguidance's w for an unconditional one."""
    return config.guidance_scale if config.cond else config.autoguidance_scale


def image_shape(config, count):
    """The shape of what the sampler draws for `count` images: [count, C, S, S], or for a
    latent model (II.16) its latents [count, L, S/f, S/f]."""
    config = network_config(config)
    return (count, config.channels, config.image_size, config.image_size)


def save_sample_grid(model, scheduler, config, path, guide=None, per_class=8, seed=0):
    """The picture written after each epoch: a row per class, named where the data has names
    (an 8×8 grid if unconditional). A checkpoint that samples all T steps draws it with DDIM
    20, which takes seconds."""
    device = next(model.parameters()).device
    model.eval()
    labels = None
    if config.cond:
        labels = torch.arange(config.num_classes, device=device).repeat_interleave(per_class)
    count = len(labels) if config.cond else 64
    sampler, steps = sampler_and_steps(config)
    if sampler in ("ddpm", "vanilla"):
        sampler, steps = "ddim", 20
    images = generate(model, scheduler, config, labels, shape=image_shape(config, count),
                      guidance_scale=default_guidance_scale(config), sampler=sampler,
                      steps=steps, guide=guide, generator=torch.Generator().manual_seed(seed))
    if config.cond and config.class_names:
        rows = [(name[:14], as_picture(chunk, per_class, scale=1))
                for name, chunk in zip(config.class_names, images.split(per_class))]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        title = f"{os.path.basename(config.data)}: a row per class"
        sheet(title, rows, margin=90).save(path)
    else:
        save_grid(images, path, nrow=per_class if config.cond else 8)
    model.train()


# ---------------------------------------------------------------------------------------------
# III.4 Checkpoints: written durably (fsync, then an atomic rename), only from finite weights,
#     and holding every random state of the run, so that --resume continues it bit for bit.
# ---------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = 2  # 1: before the adaLN chunks followed the order the sub-layers run in


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
             "guide": None if run.guide is None else run.guide.state_dict(),
             "format": CHECKPOINT_FORMAT}
    durable_save(state, path)


# A checkpoint written before a field existed means what the file did then.
BEFORE_FIELD_EXISTED = {"guidance_low": 0.0, "guidance_high": 1.0, "guide_at": 0.0,
                        "t_sampling": "uniform"}


def adaln_in_running_order(rows, config):
    """Format 1 kept a conditional block's adaLN rows as [self-attn, MLP, cross-attn]; today
    they are [self-attn, cross-attn, MLP], the order the sub-layers run in."""
    D = config.width
    if not config.cond or rows.shape[0] != 9 * D:
        return rows
    return torch.cat([rows[:3 * D], rows[6 * D:], rows[3 * D:6 * D]])


def upgrade_checkpoint(state, config):
    """A format-1 checkpoint in today's layout: adaLN rows reordered, and the optimizer's
    per-parameter state renumbered (ConvDiT now registers its stem and head last)."""
    old_names = list(state["model"])
    for part in ("model", "ema", "guide"):
        weights = state.get(part) or {}
        for name in [name for name in weights if ".ada_ln.1." in name]:
            weights[name] = adaln_in_running_order(weights[name], config)
    if "optimizer" in state:
        new_names = [name for name, _ in build_network(config).named_parameters()]
        moments = state["optimizer"]["state"]
        renumbered = {}
        for index, name in enumerate(new_names):
            moment = moments.get(old_names.index(name))
            if moment is not None and ".ada_ln.1." in name:
                moment = {key: adaln_in_running_order(value, config) if value.dim() else value
                          for key, value in moment.items()}
            if moment is not None:
                renumbered[index] = moment
        state["optimizer"]["state"] = renumbered
    state["format"] = CHECKPOINT_FORMAT
    return state


def load_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; make one with `python vanilla_diffusion.py "
                        f"train --cond` (it writes runs/ckpt.pt) or pass --ckpt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        config = Config(**{**BEFORE_FIELD_EXISTED, **state["config"]})
        if state.get("format", 1) < CHECKPOINT_FORMAT:
            state = upgrade_checkpoint(state, config)
    except Exception as error:
        raise UserError(f"{path} is not a readable VanillaDiffusion checkpoint "
                        f"({first_line(error)})") from None
    return state, config


# Two trained models ship with the file (README: where they come from): sampling weights only.
DEFAULT_CKPT = os.path.join("runs", "ckpt.pt")
SHIPPED_MODELS = {kind: os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                     "models", f"{kind}.pt")
                  for kind in ("conditional", "unconditional")}


def shown_path(path):
    """A path as a user would type it from here: relative if below this folder."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def cache_folder(ckpt):
    """Where the judges of a checkpoint are cached: beside it, but never inside assets/."""
    is_shipped = os.path.abspath(ckpt) in SHIPPED_MODELS.values()
    return "runs" if is_shipped else os.path.dirname(os.path.abspath(ckpt))


def load_guide(state, config, device):
    """The autoguidance guide stored in a checkpoint, or None."""
    if state.get("guide") is None:
        return None
    guide = build_network(config).to(device)
    guide.load_state_dict(state["guide"])
    return guide.eval()


def network_config(config):
    """The config of the denoiser itself: for a latent model (II.16) it sees the latent."""
    if not config.latent:
        return config
    return replace(config, latent=False, channels=config.latent_channels,
                   image_size=config.image_size // config.latent_factor)


def build_network(config):
    """The network a config describes: I.3's DiT, II.1's ConvDiT, or II.15's UNet; for a
    latent model, the one of its latent inside II.16's LatentDiffusion."""
    if config.latent:
        vae = VAE(config.channels, config.latent_channels, config.latent_factor)
        return LatentDiffusion(build_network(network_config(config)), vae, config.latent_scale)
    if config.arch == "unet":
        return UNet(config)
    return ConvDiT(config) if config.conv_channels else DiT(config)


def build_model(config, device):
    return build_network(config).to(device), scheduler_for(config).to(device)


Loaded = collections.namedtuple("Loaded", "model scheduler config guide state")


def load_model(path, device):
    """The EMA weights of a checkpoint in a model rebuilt from its stored config, and its
    autoguidance guide (or None)."""
    state, config = load_checkpoint(path, device)
    model, scheduler = build_model(config, device)
    try:
        model.load_state_dict(state["ema"])
    except (KeyError, RuntimeError) as error:
        raise UserError(f"the weights in {path} do not fit the model its config describes "
                        f"(made by another version of this file?): {first_line(error)}") from None
    return Loaded(model.eval(), scheduler, config, load_guide(state, config, device), state)


# ---------------------------------------------------------------------------------------------
# III.5 The training run: I.5's step inside a loop (nanoGPT's train.py style), and around it
#     small functions that start or restore a run, print progress, stop cleanly on Ctrl-C and
#     stop at once if the loss diverges.
# ---------------------------------------------------------------------------------------------

def training_loss(model, scheduler, x0, labels, config, generator=None, noise=None,
                  teacher=None):
    """The loss the config asks for: per image [B], and each image's noise level in [0, 1) [B].
    --vanilla: I.5's ddpm_loss; otherwise II.3's denoising_loss, II.10's flow loss (on II.17's
    coupled noise, if given), or II.18's consistency loss against the teacher."""
    labels = labels if config.cond else None  # the unconditional model never sees a label
    if config.distill_from:
        grid = consistency_grid(scheduler, config.consistency_steps)
        return consistency_loss(model, teacher, scheduler, config, x0, labels, grid, generator)
    if config.vanilla:
        per_image, t = ddpm_loss(model, scheduler, x0, labels, config.label_drop, generator)
        return per_image, t.float() / config.num_timesteps
    if config.objective == "flow":
        return flow_matching_loss(model, x0, labels, config, generator, noise)
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


@dataclass
class Run:
    """Everything a training run needs to continue exactly where it stopped."""
    model: nn.Module
    ema: nn.Module             # the weights used for sampling (II.4)
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # every random draw of training: t, ε, label dropout
    step: int = 0
    guide: nn.Module = None    # unconditional: a frozen early copy of the EMA (II.5)


def start_run(config, device, seed, checkpoint=None, path="", initial=None):
    """A new run from `seed`, with the `initial` weights it names if given (a latent model's
    VAE, a reflow's teacher), or the run stored in `checkpoint` restored exactly; and the noise
    scheduler it trains with."""
    torch.manual_seed(seed)
    model, scheduler = build_model(config, device)
    if initial is not None and model.load_state_dict(initial, strict=False).unexpected_keys:
        raise UserError("the initial weights do not fit the model")
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  betas=(0.9, config.adam_beta2), weight_decay=0.0)
    run = Run(model.train(), ema, optimizer, torch.Generator(device).manual_seed(seed))
    if checkpoint is None:
        return run, scheduler
    if len(checkpoint["generator"]) != len(run.generator.get_state()):
        raise UserError(f"cannot resume {path} on {device}: it was trained on another kind of "
                        f"device, whose random-number state cannot move; resume it with the "
                        f"--device it was trained on (sample and evaluate run on any device)")
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


def update_averages(run, config, total_steps):
    """The EMA of the weights (II.4); for an unconditional model also, once, a frozen early
    copy of it: the weak guide of autoguidance (II.5)."""
    update_ema(run.ema, run.model, ema_decay_at(run.step, config.ema_decay))
    if not config.cond:
        run.guide = guide_snapshot(run.ema, run.step, total_steps, config.guide_at) or run.guide


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
    resumes exactly; a second Ctrl-C stops at once, unless `keep` (torchrun sends every worker
    a second SIGINT of its own, then waits for them)."""

    def __init__(self, keep=False):
        self.keep = keep

    def __enter__(self):
        self.pressed, self.previous = False, None
        try:
            self.previous = signal.signal(signal.SIGINT, self.press)
        except ValueError:  # not the main thread: Ctrl-C cannot reach us anyway
            pass
        return self

    def press(self, signum, frame):
        self.pressed = True
        if not self.keep:
            signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exception):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Progress:
    """A line every few seconds (step, loss, lr, images/s, ETA) and, per epoch, the loss per
    tenth of t: docs/experiments.md lists reference values to compare with."""

    def __init__(self, first_step, total_steps, batch_size, num_images, device):
        self.total_steps, self.batch_size = total_steps, batch_size
        self.steps_per_epoch = num_images // batch_size
        self.clock = Clock(total_steps, first_step)
        self.bucket_loss = torch.zeros(10, device=device)    # summed loss per tenth of t
        self.bucket_count = torch.zeros(10, device=device)

    def epoch_ended(self, step):
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def update(self, step, loss, per_image, noise_level, lr):
        buckets = (noise_level * 10).long().clamp(0, 9)
        self.bucket_loss.index_add_(0, buckets, per_image.detach().float())
        self.bucket_count.index_add_(0, buckets, torch.ones_like(per_image))
        if self.clock.due(step):
            rate, epoch = self.clock.rate(step) * self.batch_size, step / self.steps_per_epoch
            self.clock.say(step, f"step {step}/{self.total_steps}  epoch {epoch:.2f}  loss "
                                 f"{loss:.4f}  lr {lr:.2e}  {rate:.0f} img/s")

    def print_loss_per_tenth_of_t(self):
        means = (self.bucket_loss / self.bucket_count.clamp(min=1)).tolist()
        overall = (self.bucket_loss.sum() / self.bucket_count.sum().clamp(min=1)).item()
        print(f"mean loss {overall:.4f}; per tenth of t (low noise → high noise): "
              + " ".join(f"{value:.3f}" for value in means), flush=True)
        self.bucket_loss.zero_()
        self.bucket_count.zero_()


def checked_step(model, optimizer, loss, step, lr, ckpt_path):
    """I.5's train_step, stopped before the weights move if the loss or the gradient is not
    finite: the run ends with one line, and the last checkpoint stays as it was."""
    if torch.isfinite(loss):
        try:
            return train_step(model, optimizer, loss)
        except RuntimeError as error:  # clip_grad_norm_'s error_if_nonfinite, before the update
            if "non-finite" not in str(error):
                raise
    raise UserError(f"training diverged at step {step}: the loss is {loss.item():.3g} at "
                    f"learning rate {lr:.3g}; nothing was saved and {ckpt_path} (if any) "
                    f"keeps the last good weights; try a smaller --lr")


def end_of_epoch(run, config, scheduler, out_dir, seed, progress):
    """Print the loss per tenth of t, save the checkpoint and a grid of samples."""
    progress.print_loss_per_tenth_of_t()
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    save_checkpoint(ckpt_path, run, config, seed)
    grid_path = os.path.join(out_dir, f"samples_step{run.step:06d}.png")
    save_sample_grid(run.ema, scheduler, config, grid_path, run.guide)
    print(f"saved {ckpt_path} and {grid_path}", flush=True)


class OwnShare(nn.Module):
    """Under torchrun every rank draws the whole batch's t, ε and label dropout from the same
    seeded generator (the draws one process makes) and builds the whole x_t; the network runs
    on this rank's share of the batch only. The rest of its output is zero, and unused."""

    def __init__(self, network, share):
        super().__init__()
        self.network, self.share = network, share

    def forward(self, x, t, labels=None):
        mine = self.share
        output = torch.zeros_like(x)
        output[mine] = self.network(x[mine], t[mine], None if labels is None else labels[mine])
        return output


def trained_vae(config, images, out_dir, epochs=2):
    """Stage one of latent diffusion (II.16): the VAE, trained on the images and cached at
    <out-dir>/vae.pt, and the scale k = 1/std(μ) of its latents on the first 10,000 images.
    Under torchrun rank 0 trains it; the others read it."""
    path, (rank, world) = os.path.join(out_dir, "vae.pt"), distributed()
    torch.manual_seed(0)
    vae = VAE(config.channels, config.latent_channels, config.latent_factor).to(images.device)
    if rank == 0 and not os.path.isfile(path):
        print(f"training the VAE of latent diffusion (cached at {path})", flush=True)
        train_vae(vae, images, epochs, progress_line("VAE"))
        durable_save({"vae": vae.state_dict(), "scale": latent_scale(vae, images)}, path)
    if world > 1:
        dist.barrier()  # rank 0 has written it
    try:
        cached = torch.load(path, map_location=images.device, weights_only=True)
        vae.load_state_dict(cached["vae"])
    except Exception as error:
        raise UserError(f"cannot read the VAE cached at {path} ({first_line(error)}); delete "
                        f"it to train a new one") from None
    print(f"VAE latents {image_shape(config, 1)[1:]}, scale k = {cached['scale']:.4f}")
    return cached["vae"], cached["scale"]


def shared_network(model, batch_size, rank, world):
    """The network a rank trains, and its share of the batch: the model itself and all of it
    in a plain run; under torchrun DDP's wrapper, which averages the shares' gradients."""
    if world == 1:
        return model, slice(None)
    from torch.nn.parallel import DistributedDataParallel
    share = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    return OwnShare(DistributedDataParallel(model), share), share


def agree(loss, stop, world, device):
    """Under torchrun: the whole batch's mean loss, and whether any rank saw Ctrl-C (all ranks
    stop after the same step)."""
    if world == 1:
        return loss, stop
    agreed = torch.tensor([loss / world, float(stop)], device=device)
    dist.all_reduce(agreed)
    return agreed[0].item(), agreed[1].item() > 0


def optimizer_step(run, network, share, scheduler, config, batch, lr, ckpt_path, teacher=None):
    """I.5's train_step on this process's share of the batch (pixels, labels, and II.17's
    coupled noise or None), stopped before a bad update: each image's loss [B] and noise
    level [B], and the share's mean loss. teacher: II.18's, for a distillation."""
    pixels, labels, noise = batch
    x0 = as_x0(pixels)
    if config.latent:  # II.16: the denoiser learns the VAE's latents
        with torch.no_grad():
            x0 = run.model.encode(x0)
    per_image, noise_level = training_loss(network, scheduler, x0, labels, config,
                                           run.generator, noise, teacher)
    loss = per_image[share].mean()
    checked_step(run.model, run.optimizer, loss, run.step, lr, ckpt_path)
    return per_image, noise_level, loss


def train(config, data, *, out_dir, total_steps, seed=0, checkpoint=None, rank=0, world=1,
          initial=None, teacher=None):
    """Algorithm 1 for total_steps on data (Images: uint8 pixels, or II.17's pairs) from seed, or
    `initial` weights (and II.18's teacher); the Run (short after a Ctrl-C). Rank 0: the EMA."""
    device, ckpt_path, main = data.pixels.device, os.path.join(out_dir, "ckpt.pt"), rank == 0
    run, scheduler = start_run(config, device, seed, checkpoint, ckpt_path, initial)
    (network, share), stop = shared_network(run.model, config.batch_size, rank, world), False
    progress = Progress(run.step, total_steps, config.batch_size, len(data), device)
    with StopOnCtrlC(keep=world > 1) as ctrl_c:
        while run.step < total_steps and not stop:

            # draw the batch: the indices of this step's images and labels
            batch = batch_indices(run.step, config.batch_size, len(data), seed).to(device)

            # set the learning rate for this step: linear warm-up, then cosine decay
            lr = set_learning_rate(run.optimizer, learning_rate(run.step, total_steps, config))

            # forward, backward, update (I.5's train_step, with a stop before a bad update)
            per_image, noise_level, loss = optimizer_step(run, network, share, scheduler, config,
                                                          data.take(batch), lr, ckpt_path, teacher)

            # the exponential moving average of the weights (and the guide of autoguidance)
            if main:
                update_averages(run, config, total_steps)
            run.step += 1

            # progress, and at the end of each epoch a checkpoint and a picture (rank 0's)
            shown, stop = agree(loss.item(), ctrl_c.pressed, world, device)
            if main:
                progress.update(run.step, shown, per_image[share], noise_level[share], lr)
            if main and progress.epoch_ended(run.step):
                end_of_epoch(run, config, scheduler, out_dir, seed, progress)
    if run.step < total_steps and main:  # Ctrl-C: the step in flight finished, the state is whole
        save_checkpoint(ckpt_path, run, config, seed)
    return run


# ---------------------------------------------------------------------------------------------
# III.6 Evaluation: how good are the samples?
#     A small CNN, trained on the data, checks that each sample shows its label; its features
#     give a Fréchet distance to real images (the FID formula of Heusel et al. 2017, with this
#     small network in place of Inception).
# ---------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN (MNIST: > 99% test accuracy after two epochs); features() is its 128-d
    penultimate layer."""

    def __init__(self, channels=1, size=28, num_classes=NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(*conv_block(channels, 32), *conv_block(32, 64),  # 28 → 14 → 7
                                  *conv_block(64, 128), nn.Flatten(),              # → 3
                                  nn.Linear(128 * (size // 8) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def features(self, x):
        return self.body(x)             # [B, 128]

    def forward(self, x):
        return self.head(self.body(x))  # [B, K] logits


@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """Class probabilities [N, K] and penultimate features [N, 128] of images (uint8, or
    floats in [−1, 1])."""
    classifier.eval()
    features = torch.cat([classifier.features(as_x0(images[i:i + batch_size]))
                          for i in range(0, len(images), batch_size)])
    return classifier.head(features).softmax(dim=1), features


def cached_classifier(path, network, what, fit, data, report):
    """`network` (built from seed 0) with the weights cached at `path`; where none can be
    read, fit(net, pixels, labels) trains it on data() → (train Images, test Images),
    report(net, test pixels, labels) prints how good it is, and it is cached there."""
    if os.path.isfile(path):
        try:
            network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return network.eval()
        except Exception:  # a damaged cache is only a cache: train a new one
            print(f"could not read the cached classifier {path}; training a new one", flush=True)
    print(f"training {what} (cached at {path})", flush=True)
    train_images, test_images = data()
    fit(network, train_images.pixels, train_images.labels)
    report(network.eval(), test_images.pixels, test_images.labels)
    try:
        durable_save(network.state_dict(), path)
    except OSError as error:  # a cache we cannot write costs a minute next time, nothing more
        print(f"could not cache the classifier at {path} ({error.strerror})", flush=True)
    return network.eval()


def get_classifier(path, config, data, device):
    """The judge of a config's data (MNIST: two epochs, about a minute on 2 cores)."""
    def report(classifier, images, labels):
        accuracy = (classify(classifier, images)[0].argmax(1) == labels).float().mean()
        print(f"classifier trained: {accuracy.item():.2%} on the {len(images):,} test images")

    torch.manual_seed(0)
    network = Classifier(config.channels, config.image_size, config.num_classes).to(device)
    cross_entropy = lambda net, x, y: F.cross_entropy(net(x), y)
    fit = lambda net, x, y: fit_network(net, cross_entropy, x, y, 2, progress_line("classifier"))
    return cached_classifier(path, network, "the evaluation classifier", fit, data, report)


@torch.no_grad()
def accuracy_per_tenth_of_t(classifier, scheduler, images, labels):
    """The noisy classifier's accuracy on images noised to a t in each tenth of [0, T)."""
    T, generator = scheduler.num_timesteps, torch.Generator().manual_seed(0)
    images, accuracies = as_x0(images), []
    for tenth in range(10):
        t = torch.randint(tenth * T // 10, (tenth + 1) * T // 10, (len(images),),
                          generator=generator).to(images.device)
        x_t, _ = scheduler.noise_image(images, t, gaussian_like(images, generator))
        accuracies.append((classifier(x_t, t).argmax(1) == labels).float().mean().item())
    return accuracies


def get_noisy_classifier(path, scheduler, config, data, device):
    """II.9's p_φ(y | x_t, t), trained once on noise_image of the config's data."""
    def report(classifier, images, labels):
        accuracies = accuracy_per_tenth_of_t(classifier, scheduler, images[:2000], labels[:2000])
        print("noisy classifier: accuracy per tenth of t (low noise → high noise): "
              + " ".join(f"{accuracy:.0%}" for accuracy in accuracies), flush=True)

    torch.manual_seed(0)
    network = NoisyClassifier(config.channels, config.image_size, config.num_classes).to(device)
    fit = lambda net, x, y: train_noisy_classifier(net, scheduler, x, y, 3,
                                                   progress_line("classifier"))
    return cached_classifier(path, network, "the noisy classifier of classifier guidance", fit,
                             data, report)


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
    """`count` samples, `batch_size` at a time, one generator throughout; a progress line every
    few seconds."""
    chunks, clock = [], Clock(count)
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        chunk_labels = None if labels is None else labels[start:start + size]
        chunks.append(generate(model, scheduler, config, chunk_labels,
                               shape=image_shape(config, size), **sampling))
        if clock.due(start + size) and start + size < count:
            clock.say(start + size, f"  drew {start + size:,}/{count:,}")
    return torch.cat(chunks)


def faint_share(images):
    """The share of faint pixels, (x + 1)/2 ∈ [0.02, 0.25]: grey speckle and halos, which the
    Fréchet distance barely sees (real MNIST digits have about 3%)."""
    pixels = to_pixels(as_x0(images))
    return ((pixels >= 0.02) & (pixels <= 0.25)).float().mean().item()


def judge_samples(classifier, samples, labels, test_features, names, floor=0.0):
    """One row of the evaluation table: accuracy and worst class (conditional) or the share of
    confident samples and each class's share (unconditional), the Fréchet distance, and its
    excess over the floor (real images judged alike)."""
    probabilities, features = classify(classifier, samples.clamp(-1, 1))
    predicted = probabilities.argmax(dim=1)
    distance = frechet_distance(features, test_features)
    row = {"distance": distance, "excess": distance - floor, "faint": faint_share(samples)}
    if labels is not None:
        per_class = torch.stack([(predicted[labels == k] == k).float().mean()
                                 for k in range(len(names))])
        worst = per_class.argmin().item()
        row.update(accuracy=per_class.mean().item(),
                   worst=f"{names[worst]}: {per_class[worst]:.0%}")
    else:
        row["confident"] = (probabilities.max(dim=1).values >= 0.9).float().mean().item()
        shares = torch.bincount(predicted.cpu(), minlength=len(names)) / len(samples)
        row["shares"] = " ".join(f"{share:.0%}" for share in shares.tolist())
    return row


# The evaluation table's columns: (header, width, format, key in the row)
SETTING_COLUMNS = [("sampler", 18, "", "sampler"), ("evals", 5, "", "evals"), ("w", 5, "g", "w")]
CLASS_COLUMNS = [("accuracy", 9, ".1%", "accuracy"), ("worst class", 14, "", "worst")]
DISTANCE_COLUMNS = [("distance", 9, ".2f", "distance"), ("-floor", 7, ".2f", "excess"),
                    ("faint", 6, ".1%", "faint")]


def print_row(columns, row=None, tail=""):
    """One line of the table: each value of the row right-aligned in its column (no row: the
    headers), then the tail."""
    cells = [f"{name:>{width}}" if row is None else f"{row[key]:>{width}{form}}"
             for name, width, form, key in columns]
    print(" ".join(cells) + (f"  {tail}" if tail else ""), flush=True)


def real_data_reference(classifier, train_images, test_images, count, seed):
    """The test set's features, and the floor: the distance of as many real training images,
    judged alike (a sample's distance − floor is what the model adds), with the accuracy the
    judge gives them (a model that drew the training set exactly would read about that)."""
    test_features = classify(classifier, test_images.pixels)[1]
    pick = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))
    pick = pick[:count].to(train_images.pixels.device)
    real, labels = train_images.pixels[pick], train_images.labels[pick]
    probabilities, features = classify(classifier, real)
    floor = frechet_distance(features, test_features)
    accuracy = (probabilities.argmax(1) == labels).float().mean().item()
    print(f"{count} real training images against the test set (the floor): distance "
          f"{floor:.2f}, accuracy {accuracy:.2%}, faint pixels {faint_share(real):.1%}")
    return test_features, floor


@torch.no_grad()
def print_vae_floor(model, classifier, images, test_features):
    """What latent diffusion cannot beat: real test images passed through the VAE, judged."""
    decoded = torch.cat([model.decode(model.encode(as_x0(images[i:i + 500])))
                         for i in range(0, len(images), 500)])
    floor = frechet_distance(classify(classifier, decoded)[1], test_features)
    print(f"{len(images)} real test images through the VAE (its floor): distance {floor:.2f}, "
          f"faint pixels {faint_share(decoded):.1%}")


def evaluate(model, scheduler, config, classifier, data, *, settings, guidance_scales,
             per_label, batch_size, seed, guidance_interval=None, guide=None,
             noisy_classifier=None, classifier_scales=None, options=None):
    """For each (sampler, steps), each w and each s of classifier guidance: draw per_label
    samples of every class, judge them against data = (train Images, test Images)."""
    device = next(model.parameters()).device
    names = label_names(config)
    count = per_label * len(names)
    test_features, floor = real_data_reference(classifier, *data, count, seed)
    if config.latent:
        print_vae_floor(model, classifier, data[1].pixels[:count], test_features)
    labels = None
    if config.cond or classifier_scales:  # per_label of each class, in order
        labels = torch.arange(len(names), device=device).repeat_interleave(per_label)
    setting = SETTING_COLUMNS + ([("s", 4, "g", "s")] if classifier_scales else [])
    judged = CLASS_COLUMNS + DISTANCE_COLUMNS if labels is not None else DISTANCE_COLUMNS + [
        ("confident", 10, ".1%", "confident")]
    columns = setting + judged + [("s/image", 8, ".2g", "seconds")]
    print_row(columns, tail="" if labels is not None else "share of each predicted class")
    for (sampler, steps), w, s in itertools.product(settings, guidance_scales,
                                                     classifier_scales or [0.0]):
        started = time.time()
        samples = draw_in_batches(model, scheduler, config, labels, count, batch_size,
                                  guidance_scale=w, sampler=sampler, steps=steps,
                                  guidance_interval=guidance_interval, guide=guide,
                                  classifier=noisy_classifier, classifier_scale=s,
                                  generator=torch.Generator().manual_seed(seed), **(options or {}))
        row = judge_samples(classifier, samples, labels, test_features, names, floor)
        row.update(sampler=sampler, evals=network_evaluations(sampler, steps), w=w, s=s,
                   seconds=(time.time() - started) / count)
        print_row(columns, row, row.get("shares", ""))


# ---------------------------------------------------------------------------------------------
# III.7 Pictures of the process: `show`
#     What the network sees and guesses, how a sample goes from coarse to fine, where the label
#     acts, why few steps are enough, and whether the model copies its training set. The
#     numbers come from small functions that reuse Parts I and II; the drawing is plain PIL.
# ---------------------------------------------------------------------------------------------

SHOW_TIMESTEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999)
SHOW_EVALUATIONS = (1, 2, 5, 10, 20, 50)
SHOW_SIGMA_SAMPLERS = ("euler", "euler-a", "heun", "dpm++2m-karras", "dpm++2m-sde-karras")


@torch.no_grad()
def guesses_at(model, scheduler, config, x0, labels, timesteps, noise):
    """For each t: x_t from x0 and one fixed ε, and the network's one-step guess of x0 (its
    own label, no guidance): two [K, B, C, H, W] tensors."""
    denoise = Denoiser(model, scheduler, config, labels if config.cond else None, 1.0)
    strengths = [t / (config.num_timesteps - 1) for t in timesteps]
    noisy = [noised_start(scheduler, config, x0, strength, noise) for strength in strengths]
    guesses = [clean_guess(scheduler, config, x_t, t, denoise(x_t, t))
               for x_t, t in zip(noisy, timesteps)]
    return torch.stack(noisy), torch.stack(guesses)


@torch.no_grad()
def guidance_push(model, scheduler, config, x_t, t, labels, guidance_scale, guide=None):
    """Where guidance (II.5) pushes at this step: |guided − the model alone| per pixel, that
    is (w − 1)·|ε_c − ε_∅| (or the same against the guide), averaged over the colour channels;
    0 where w = 1. [B, H, W]"""
    interval = (config.guidance_low, config.guidance_high)
    guided = Denoiser(model, scheduler, config, labels, guidance_scale, None, interval, guide)
    alone = Denoiser(model, scheduler, config, labels, 1.0)
    return (guided(x_t, t) - alone(x_t, t)).abs().mean(dim=1)


def attention_weights(attention, x, context):
    """softmax(QKᵀ/√d) [B, h, N, M] of an I.3 Attention: what scaled_dot_product_attention
    computes inside, and never returns."""
    q, k, _ = attention.project(x, context)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


@torch.no_grad()
def label_attention(model, x_t, t, labels):
    """The share of each image position's cross-attention that goes to the label's tokens (the
    rest goes to the timestep token), averaged over heads and layers: [B, grid, grid], on the
    finest grid of the layers (the DiT's patches; a UNet's S/2)."""
    shares = []
    layers = [module.cross_attn for module in model.modules()
              if getattr(module, "cross_attn", None) is not None]
    hooks = [layer.register_forward_hook(lambda attention, inputs, output: shares.append(
        attention_weights(attention, *inputs)[..., :model.config.label_tokens].sum(-1)))
        for layer in layers]                                        # each [B, h, N]
    try:
        model(x_t, torch.full((len(x_t),), float(t), device=x_t.device), labels)
    finally:
        for hook in hooks:
            hook.remove()
    grid = max(math.isqrt(share.shape[-1]) for share in shares)
    maps = [share.mean(1).reshape(len(x_t), 1, math.isqrt(share.shape[-1]), -1)
            for share in shares]                                    # [B, 1, g, g] each
    return torch.stack([F.interpolate(m, size=(grid, grid)) for m in maps]).mean(0)[:, 0]


def samplers_to_show(config, evaluations):
    """The samplers a checkpoint takes, each at every number of network evaluations, and (for a
    DDPM checkpoint) DDPM over all T as the reference, its own row of one: {name: counts}."""
    if config.distill_from:  # II.18: its own sampler only (draw_few_steps adds the teacher)
        return {"consistency": evaluations}
    if config.objective == "flow":
        return {"euler": evaluations}
    steps = {name: evaluations for name in ["ddim", "dpm", *SHOW_SIGMA_SAMPLERS]}
    return {**steps, "ddpm": [config.num_timesteps]}


def sampler_rows(model, scheduler, config, labels, guidance_scale, guide, noise, steps):
    """From one noise: each sampler of steps = {name: counts} at each count of network
    evaluations. {name: [images [B, C, H, W], ...]}"""
    return {name: [generate(model, scheduler, config, labels, shape=noise.shape,
                            guidance_scale=guidance_scale, sampler=name, steps=count,
                            guide=guide, noise=noise, generator=torch.Generator().manual_seed(0))
                   for count in counts] for name, counts in steps.items()}


def nearest_neighbours(queries, references, k=3):
    """The k references nearest to each query by pixel distance ‖a − b‖ on the [0, 1] scale:
    distances [Q, k] and indices [Q, k]."""
    distances = torch.cdist(to_pixels(as_x0(queries)).flatten(1),
                            to_pixels(as_x0(references)).flatten(1))
    return distances.topk(k, dim=1, largest=False)


def font(size=12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1: one size only
        return ImageFont.load_default()


def as_heat_map(maps, nrow, top, bottom=0.0, size=28, scale=2):
    """Maps [B, h, w], upscaled (nearest) to size × size, as black → red → yellow → white for
    bottom → top: one fixed scale, so that pictures side by side compare."""
    from PIL import Image
    from torchvision.utils import make_grid
    v = F.interpolate(maps[:, None].float().cpu(), size=(size, size))
    v = ((v - bottom) / max(float(top) - float(bottom), 1e-12)).clamp(0, 1)
    rgb = torch.cat([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)], 1)
    grid = make_grid(rgb, nrow=nrow, padding=2, pad_value=1)
    picture = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy(), mode="RGB")
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def text_strip(texts, size=28, scale=2, height=16):
    """Texts centred over the cells of an as_picture grid of size-pixel images, len(texts)
    columns."""
    from PIL import Image, ImageDraw
    cell = (size + 2) * scale
    strip = Image.new("RGB", (cell * len(texts) + 2 * scale, height), "white")
    draw = ImageDraw.Draw(strip)
    for k, text in enumerate(texts):
        x = 2 * scale + k * cell + (cell - draw.textlength(text, font=font())) / 2
        draw.text((x, 2), text, fill="black", font=font())
    return strip


def sheet(title, rows, margin=110, columns=None, size=28):
    """Pictures stacked top to bottom on white, each with its label in the left margin, under
    a title of one or more lines and, if given, a strip of column titles."""
    from PIL import Image, ImageDraw
    rows = ([("", text_strip(columns, size))] if columns else []) + rows
    lines = title.split("\n")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([margin + picture.width for _, picture in rows]
                + [8 + probe.textlength(line, font=font(13)) for line in lines])
    top = 8 + 18 * len(lines)
    canvas = Image.new("RGB", (round(width), top + sum(p.height + 4 for _, p in rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, 4 + 18 * k), line, fill="black", font=font(13))
    y = top
    for label, picture in rows:
        canvas.paste(picture, (margin, y))
        draw.text((4, y + picture.height // 2 - 7), label, fill="black", font=font())
        y += picture.height + 4
    return canvas


def x_and_guess(xs, guesses, nrow):
    """The two rows of a step: x_t and the guess of x0."""
    return [("x_t", as_picture(xs, nrow)), ("guess of x0", as_picture(guesses, nrow))]


def curve_plot(curves, columns, size=28, scale=2, height=110):
    """Curves of values in [0, 1] against t ∈ [0, T−1], under a text_strip of `columns` cells
    for t = 0, 100, …: [(name, values [T], colour)] → a picture."""
    from PIL import Image, ImageDraw
    cell = (size + 2) * scale
    picture = Image.new("RGB", (cell * columns + 2 * scale, height), "white")
    draw = ImageDraw.Draw(picture)
    left, top, bottom = 2 * scale + cell / 2, 8, height - 20
    x_of = lambda t: left + t / 100 * cell
    draw.line([(left, bottom), (x_of(len(curves[0][1]) - 1), bottom)], fill="grey")
    draw.text((left - 8, bottom + 4), "t = 0", fill="grey", font=font(11))
    for k, (name, values, colour) in enumerate(curves):
        points = [(x_of(t), bottom - value * (bottom - top)) for t, value in enumerate(values)]
        draw.line(points, fill=colour, width=2)
        draw.text((x_of(560), top + 22 + 16 * k), name, fill=colour, font=font())
    return picture


@dataclass
class Scene:
    """What every picture of `show` draws from: a loaded checkpoint and its sampling setup."""
    model: nn.Module
    scheduler: NoiseScheduler
    config: Config
    guide: nn.Module
    labels: torch.Tensor       # 4 of the label to draw (None: an unconditional model)
    out_dir: str
    seed: int

    @property
    def size(self):
        return self.config.image_size

    def view(self, x):
        """What x looks like: itself, or for a latent model (II.16) the picture it decodes to."""
        return self.model.decode(x) if self.config.latent else x

    def sample_labels(self, count):
        return None if self.labels is None else self.labels[:1].repeat(count)

    def sample(self, record=None, count=4, labels=None, noise=None):
        """count samples of the scene's label (or of `labels`), the checkpoint's sampler."""
        sampler, steps = sampler_and_steps(self.config)
        sampler = "ddpm" if sampler == "vanilla" else sampler  # the same loop, but recordable
        if labels is None:
            labels = self.sample_labels(count)
        return generate(self.model, self.scheduler, self.config, labels,
                        shape=image_shape(self.config, count), sampler=sampler, guide=self.guide,
                        steps=steps, noise=noise, record=record,
                        guidance_scale=default_guidance_scale(self.config),
                        generator=torch.Generator().manual_seed(self.seed))

    def save(self, picture, name):
        path = os.path.join(self.out_dir, name)
        os.makedirs(self.out_dir, exist_ok=True)
        picture.save(path)
        return path


def beside(pictures, gap=20):
    from PIL import Image
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1),
                               max(p.height for p in pictures)), "white")
    x = 0
    for picture in pictures:
        canvas.paste(picture, (x, 0))
        x += picture.width + gap
    return canvas


def draw_what_the_network_sees(scene, images, labels):
    """Picture 1: real images noised to t = 0 … T−1 (one ε each), the network's one-step
    guess of x0 under each, and the schedule's two coefficients below."""
    x0 = scene.model.encode(as_x0(images)) if scene.config.latent else as_x0(images)
    noise = gaussian_like(x0, torch.Generator().manual_seed(scene.seed))
    noisy, guesses = guesses_at(scene.model, scene.scheduler, scene.config, x0, labels,
                                SHOW_TIMESTEPS, noise)
    columns = len(SHOW_TIMESTEPS)
    rows = [row for b in range(len(x0)) for row in x_and_guess(
        scene.view(noisy[:, b]), scene.view(guesses[:, b]), columns)]
    if scene.config.objective == "flow":
        s = torch.linspace(0, 1, scene.config.num_timesteps)
        curves = [("1 - s: the image's share", 1 - s, (30, 80, 200)),
                  ("s: the noise's share", s, (200, 40, 40))]
    else:
        curves = [("sqrt(alpha_bar_t): the image's share", scene.scheduler.sqrt_alpha_bar,
                   (30, 80, 200)), ("sqrt(1 - alpha_bar_t): the noise's share",
                                    scene.scheduler.sqrt_one_minus_alpha_bar, (200, 40, 40))]
    curves = [(name, values.cpu(), colour) for name, values, colour in curves]
    rows.append(("the schedule", curve_plot(curves, columns, scene.size)))
    title = "What the network sees (x_t) and guesses in one step (x0, clamped to [-1, 1])"
    return scene.save(sheet(title, rows, columns=[f"t={t}" for t in SHOW_TIMESTEPS],
                            size=scene.size), "1_what_it_sees.png")


def draw_coarse_to_fine(scene):
    """Picture 2: x_t and the guess of x0 at every step of the default sampler, as a strip
    (at most 12 steps) and as a GIF (at most 60)."""
    record = []
    scene.sample(record)
    steps = spread(record, 12)
    rows = [row for b in range(4) for row in x_and_guess(
        scene.view(torch.stack([x[b] for _, x, _ in steps])),
        scene.view(torch.stack([g[b] for _, _, g in steps])), len(steps))]
    title = f"Coarse to fine: {len(record)} network evaluations; the digit is settled early"
    strip = scene.save(sheet(title, rows, columns=[f"t={round(t)}" for t, _, _ in steps],
                             size=scene.size), "2_coarse_to_fine.png")
    frames = [sheet(f"t = {round(t)}", x_and_guess(scene.view(x), scene.view(guess), 4))
              for t, x, guess in spread(record, 60)]
    save_gif(frames, os.path.join(scene.out_dir, "2_coarse_to_fine.gif"))
    return [strip, os.path.join(scene.out_dir, "2_coarse_to_fine.gif")]


def draw_where_the_label_acts(scene):
    """Picture 3: at six steps, where guidance pushes (against ∅, or against the guide of an
    unconditional model) and, for a conditional model, each patch's attention to the label."""
    if not scene.config.cond and scene.guide is None:
        return []  # nothing steers this model
    record = []
    scene.sample(record, count=2)
    steps = spread(record, 6)
    w, labels = default_guidance_scale(scene.config), scene.sample_labels(2)
    pushes = torch.stack([guidance_push(scene.model, scene.scheduler, scene.config, x, t,
                                        labels, w, scene.guide) for t, x, _ in steps])
    rows = []
    for b in range(2):
        rows += [("x_t", as_picture(scene.view(torch.stack([x[b] for _, x, _ in steps])),
                                    len(steps))),
                 ("guidance push", as_heat_map(pushes[:, b], len(steps), pushes.max(),
                                               size=scene.size))]
        if scene.config.cond:
            shares = torch.stack([label_attention(scene.model, x[b:b + 1], t, labels[b:b + 1])
                                  for t, x, _ in steps])[:, 0]
            low, high = shares.min().item(), shares.max().item()
            rows.append((f"label's share\n{low:.2f} to {high:.2f}",
                         as_heat_map(shares, len(steps), high, low, size=scene.size)))
    title = (f"Where the label acts. Guidance push: |guided - model alone| per pixel, "
             f"0 to {pushes.max():.2f}.")
    if scene.config.cond:
        title += ("\nLabel's share: how much of each patch's cross-attention goes to the label's "
                  "tokens (the rest goes to the timestep token), averaged over heads and blocks.")
    return [scene.save(sheet(title, rows, margin=120, size=scene.size,
                             columns=[f"t={round(t)}" for t, _, _ in steps]),
                       "3_where_the_label_acts.png")]


def teacher_row(scene, noise):
    """A consistency model's teacher (II.18) from the same noise, with its own sampler at
    each number of evaluations: {name: [images, ...]}."""
    device = next(scene.model.parameters()).device
    model, scheduler, config, guide, _ = load_model(scene.config.distill_from, device)
    sampler = sampler_and_steps(config)[0]
    row = sampler_rows(model, scheduler, config, scene.sample_labels(3),
                       default_guidance_scale(config), guide, noise, {sampler: SHOW_EVALUATIONS})
    return {f"teacher:\n{sampler}": row[sampler]}


def draw_few_steps(scene):
    """Picture 4: from one noise, each sampler at 1 … 50 network evaluations, and DDPM over
    all T steps as the reference (a consistency model: its teacher with its own sampler)."""
    noise = gaussian_like(torch.empty(image_shape(scene.config, 3)),
                          torch.Generator().manual_seed(scene.seed))
    images = sampler_rows(scene.model, scene.scheduler, scene.config, scene.sample_labels(3),
                          default_guidance_scale(scene.config), scene.guide, noise,
                          samplers_to_show(scene.config, SHOW_EVALUATIONS))
    teacher = scene.config.distill_from
    if teacher and os.path.isfile(teacher) and same_teacher(scene.config):  # else no teacher row
        images.update(teacher_row(scene, noise))
    rows = []
    for name, row in images.items():
        grid = torch.stack(row, dim=1).flatten(0, 1)                # sample-major: a row each
        label = f"ddpm, all {scene.config.num_timesteps}" if name == "ddpm" else name
        rows.append((label, as_picture(grid, len(row))))
    reference = ("its teacher with the teacher's sampler" if scene.config.distill_from
                 else "DDPM over all T steps")
    title = ("Why few steps are enough: from one noise per row, each sampler at more and more\n"
             f"network evaluations, and {reference}")
    return scene.save(sheet(title, rows, margin=140, size=scene.size,
                            columns=[f"{count} evals" for count in SHOW_EVALUATIONS]),
                      "4_few_steps.png")


def draw_is_it_copying(scene, train_images, test_images=None):
    """Picture 5: samples and real test images (a folder has none), each followed by its
    three nearest training images with their pixel distances: a copy would sit at 0."""
    labels = None
    if scene.config.cond:
        labels = torch.arange(8, device=train_images.device) % scene.config.num_classes
    queries = [("samples", scene.sample(count=8, labels=labels))]
    if test_images is not None:
        queries.append(("real test images", test_images[:8]))
    blocks = []
    for name, images in queries:
        distances, indices = nearest_neighbours(images, train_images)
        rows = [(" ".join(f"{d:.1f}" for d in distances[q].tolist()),
                 as_picture(torch.cat([as_x0(images[q:q + 1]),
                                       as_x0(train_images[indices[q]])]), 4))
                for q in range(len(images))]
        title = (f"{name} and their nearest training images\n(pixel distance; median of the "
                 f"nearest {distances[:, 0].median():.1f})")
        blocks.append(sheet(title, [("distances", text_strip(["", "1st", "2nd", "3rd"],
                                                             scene.size))] + rows, margin=100))
    return scene.save(beside(blocks), "5_is_it_copying.png")


@torch.no_grad()
def draw_the_latents(scene, images):
    """Picture 6, for a latent model (II.16): real images, each channel of their scaled latents
    as a heat map on one scale, and what the decoder makes of them."""
    x0 = as_x0(images[:8])
    latents = scene.model.encode(x0)                                     # [8, L, S/f, S/f]
    low, high = latents.min().item(), latents.max().item()
    rows = [("real", as_picture(x0, 8))]
    rows += [(f"latent {k}", as_heat_map(latents[:, k], 8, high, low, size=scene.size))
             for k in range(latents.shape[1])]
    rows.append(("decoded", as_picture(scene.model.decode(latents), 8)))
    title = (f"Latent diffusion works on these: {tuple(latents.shape[1:])} latents of the VAE, "
             f"k·μ(x) from {low:.1f} to {high:.1f}, and the decoder's reconstructions")
    return [scene.save(sheet(title, rows, margin=90, size=scene.size), "6_latents.png")]


# ---------------------------------------------------------------------------------------------
# III.8 Command line
#     train / sample / evaluate / show. Every flag is listed explicitly; every input is checked
#     before any work starts; a mistake gets one line on stderr and a non-zero exit, never a
#     traceback.
# ---------------------------------------------------------------------------------------------

# With no label to attend to, the unconditional model learns a digit's shape faster per minute
# from 4×4 = 16 larger patches with 4 heads and AdamW's β2 = 0.99 (as EDM2 uses), and gets 1.4×
# the conditional model's time (14 epochs; docs/experiments.md): its own defaults. It keeps
# DPM-Solver++ on the timestep grid: Karras σ lowers its distance (10.50 → 9.65) but also its
# share of confident samples (86.0% → 84.0%), the unconditional model's target. It keeps log-SNR
# mean −2: −1, which cleans the conditional model's backgrounds at an equal distance, costs it
# 4.4 of excess distance.
UNCONDITIONAL_DEFAULTS = {"patch_size": 7, "heads": 4, "adam_beta2": 0.99, "epochs": 14,
                          "logsnr_mean": -2.0, "sampler": "dpm"}
DISTILLATION_LR = 2e-4  # II.18 fine-tunes a trained network: the default 4e-3 collapses it


def checked(parse, wants, accept=lambda value: True):
    """An argparse type: parse(text), kept if accept(value), else "must be <wants>, got …"."""
    def convert(text):
        try:
            value = parse(text)
        except (ValueError, TypeError):
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wants}, got {text!r}")
        return value
    return convert


def floats(text):
    return [float(value) for value in text.split(",")]


positive_int = checked(int, "a positive whole number", lambda n: n >= 1)
nonnegative_int = checked(int, "a whole number ≥ 0", lambda n: n >= 0)
finite_numbers = checked(floats, "a finite number or comma-separated finite numbers",
                         lambda values: all(map(math.isfinite, values)))
interval = checked(lambda text: tuple(floats(text)), "two numbers LO,HI with 0 ≤ LO ≤ HI ≤ 1",
                   lambda pair: len(pair) == 2 and 0 <= pair[0] <= pair[1] <= 1)


def number_in(low, high, low_open=False, high_open=False):
    """A finite float in [low, high] (either end open)."""
    above = (lambda x: low < x) if low_open else (lambda x: low <= x)
    below = (lambda x: x < high) if high_open else (lambda x: x <= high)
    ends = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return checked(float, f"a number in {ends}",
                   lambda x: math.isfinite(x) and above(x) and below(x))


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (not the whole usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_common_flags(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="where to run (default: auto)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default: 0)")
    parser.add_argument("--data", default=None,
                        help=f"the pictures: {', '.join(DATASETS)}, or a folder of your own "
                             f"(subfolders: classes) (default: mnist; for a checkpoint, its own)")
    parser.add_argument("--data-dir", default="data",
                        help="where torchvision's data sets are kept, and downloaded if missing "
                             "(default: data)")


def add_train_flags(parser, defaults=Config()):
    add = parser.add_argument
    add("--cond", action="store_true",
        help="conditional model: cross-attention to the label, label dropout for CFG")
    add("--vanilla", action="store_true",
        help="train and sample exactly Part I: ε-prediction, uniform t, no conv stem, no EMA, "
             "DDPM with CFG over all T steps (none of the Part II flags below)")
    add("--epochs", type=positive_int, default=None,
        help=f"passes over the data (default: {defaults.epochs}; unconditional: "
             f"{UNCONDITIONAL_DEFAULTS['epochs']})")
    add("--max-steps", type=positive_int, default=None, help="stop after this many steps")
    add("--image-size", type=positive_int, default=None,
        help="S: the shorter side resized to S, then centre-cropped to S×S (default: the data "
             "set's own size; a folder's smallest picture, at most 64)")
    add("--batch-size", type=positive_int, default=defaults.batch_size,
        help="images per step (under torchrun: of all processes together)")
    add("--lr", type=number_in(0, 1, low_open=True), default=None,
        help=f"peak learning rate, in (0, 1] (default: {defaults.lr:g}; II.18's distillation, "
             f"which starts from trained weights: {DISTILLATION_LR:g})")
    add("--label-drop", type=number_in(0, 1, high_open=True), default=defaults.label_drop,
        help="probability of replacing a label with ∅, in [0, 1)")
    add("--warmup-steps", type=nonnegative_int, default=defaults.warmup_steps)
    add("--adam-beta2", type=number_in(0, 1, high_open=True), default=None,
        help=f"AdamW's β2, in [0, 1) (default: {defaults.adam_beta2:g}; unconditional: "
             f"{UNCONDITIONAL_DEFAULTS['adam_beta2']:g})")
    add("--out-dir", default="runs", help="where the checkpoint and sample grids go")
    add("--resume", action="store_true", help="continue the run in <out-dir>/ckpt.pt")
    add("--overwrite", action="store_true",
        help="start a new run even though <out-dir>/ckpt.pt holds one")
    add_model_flags(parser, defaults)
    add_upgrade_flags(parser, defaults)
    add_backbone_flags(parser, defaults)


def add_upgrade_flags(parser, defaults=Config()):
    """The Part II switches; None means "not given", so that --vanilla can refuse them."""
    add = parser.add_argument
    add("--conv-channels", type=nonnegative_int, default=None,
        help=f"II.1 channels of the conv stem and head; 0: plain linear patches "
             f"(default: {defaults.conv_channels})")
    add("--prediction", choices=["eps", "v", "x0"], default=None,
        help=f"II.2 what the network outputs: ε, v = √ᾱ·ε − √(1−ᾱ)·x0, or x0 "
             f"(default: {defaults.prediction})")
    add("--schedule", choices=["linear", "cosine"], default=None,
        help=f"II.14 the noise schedule: linear β or cosine ᾱ (default: {defaults.schedule})")
    add("--t-sampling", choices=["uniform", "logsnr"], default=None,
        help=f"II.3 how training draws t: uniform, or log SNR(t) ~ N(P_mean, P_std²) "
             f"(default: {defaults.t_sampling})")
    add("--logsnr-mean", type=number_in(-20, 20), default=None,
        help=f"II.3 mean of log SNR for --t-sampling logsnr (default: {defaults.logsnr_mean:g}; "
             f"unconditional: {UNCONDITIONAL_DEFAULTS['logsnr_mean']:g})")
    add("--logsnr-std", type=number_in(0, 20, low_open=True), default=None,
        help=f"II.3 its standard deviation, > 0 (default: {defaults.logsnr_std:g})")
    add("--min-snr-gamma", type=number_in(0, 1e6), default=None,
        help="II.3 γ of the min-SNR loss weight; 0 switches it off (default: 0)")
    add("--ema-decay", type=number_in(0, 1, high_open=True), default=None,
        help=f"II.4 largest EMA decay d, in [0, 1) (default: {defaults.ema_decay:g})")
    add("--objective", choices=["eps", "flow"], default=None,
        help="II.10 eps: DDPM noise prediction; flow: rectified-flow velocity (default: eps)")


def add_backbone_flags(parser, defaults=Config()):
    """II.15's UNet and II.16's latent space in place of I.3's DiT on pixels; II.17's reflow."""
    add = parser.add_argument
    add("--reflow-from", default=None, metavar="CKPT",
        help="II.17 reflow: learn the coupled pairs (noise, image) of this flow checkpoint, "
             "starting from its weights (its config; --epochs counts passes over the pairs)")
    add("--pairs", type=positive_int, default=20_000,
        help="II.17 how many pairs the teacher draws, cached in --out-dir (default: 20000)")
    add("--distill-from", default=None, metavar="CKPT",
        help="II.18 consistency distillation: learn the one-step map of this DDPM checkpoint "
             "(v or x0), from its weights and config (--epochs, --lr, --batch-size apply)")
    add("--consistency-steps", type=positive_int, default=defaults.consistency_steps,
        help=f"II.18 N, the steps of the distillation grid (default: "
             f"{defaults.consistency_steps})")
    add("--arch", choices=["dit", "unet"], default=None,
        help="II.15 the network: the DiT of I.3 (with II.1's stem) or a UNet (default: dit)")
    add("--unet-channels", type=positive_int, default=None,
        help=f"II.15 the UNet's width c at full resolution; 2c below (default: "
             f"{defaults.unet_channels})")
    add("--latent", action="store_true", default=None,
        help="II.16 latent diffusion: train a VAE first (cached in --out-dir), then the "
             "denoiser on its latents (default patch size: the largest that divides the latent, "
             "at most the pixel default / f)")
    add("--latent-channels", type=positive_int, default=None,
        help=f"II.16 L, the latent's channels (default: {defaults.latent_channels})")
    add("--latent-factor", type=int, choices=[2, 4], default=None,
        help=f"II.16 f: the latent is S/f × S/f (default: {defaults.latent_factor})")


def add_model_flags(parser, defaults=Config()):
    add = parser.add_argument
    add("--patch-size", type=positive_int, default=None,
        help=f"must divide the image size (default: {defaults.patch_size}; unconditional: "
             f"{UNCONDITIONAL_DEFAULTS['patch_size']})")
    add("--width", type=positive_int, default=defaults.width,
        help="token width D; divisible by 4 and by the head count")
    add("--depth", type=positive_int, default=defaults.depth, help="transformer blocks")
    add("--heads", type=positive_int, default=None,
        help=f"attention heads (default: {defaults.heads}; unconditional: "
             f"{UNCONDITIONAL_DEFAULTS['heads']})")


def add_ckpt_flag(parser, purpose):
    parser.add_argument("--ckpt", default=None,
                        help=f"checkpoint {purpose} (default: {DEFAULT_CKPT}, or the shipped "
                             f"{shown_path(SHIPPED_MODELS['conditional'])} until you "
                             f"train one)")


def add_sample_flags(parser, defaults=Config()):
    add = parser.add_argument
    add_ckpt_flag(parser, "to draw from")
    add("--label", default=None,
        help="the class to draw, by index or name (MNIST: a digit); without it a conditional "
             "model draws one row per class")
    add("--negative-label", default=None,
        help="the class to steer away from (it fills the unconditional branch)")
    add("--n", type=positive_int, default=16,
        help="number of images (per class without --label) (default: 16)")
    add("--guidance-scale", type=finite_numbers, default=None,
        help=f"w in ε_∅ + w·(ε_c − ε_∅); several, comma-separated, draw a row each "
             f"(default: the checkpoint's: {defaults.guidance_scale:g} for CFG, "
             f"{defaults.autoguidance_scale:g} for an unconditional model's autoguidance)")
    add("--guidance-interval", type=interval, default=None,
        help="LO,HI: guide only where t/(T−1) lies in [LO, HI] (default: the checkpoint's)")
    add("--sampler", choices=SAMPLERS, default=None, metavar="NAME",
        help="; ".join(f"{name}: {webui}" for name, webui in SAMPLERS.items())
        + " (default: the checkpoint's)")
    add("--steps", type=positive_int, default=None,
        help="network evaluations of the few-step samplers; heun takes two a step, so at most "
             "this many (default: the checkpoint's)")
    add("--init-image", default=None, help="image-to-image: start from this picture")
    add("--strength", type=number_in(0, 1, low_open=True), default=0.6,
        help="image-to-image: how far to noise the picture, in (0, 1] (default: 0.6)")
    add("--classifier-scale", type=number_in(0, 100), default=0.0,
        help="s of classifier guidance (II.9), also for an unconditional model with --label; "
             "trains a noisy classifier next to the checkpoint the first time (default: 0, off)")
    add_sampler_option_flags(parser)
    add("--output", default="samples.png", help="picture to write (default: samples.png)")
    add("--gif", default=None, help="also write the denoising as an animated GIF here")


def add_sampler_option_flags(parser):
    """The options of particular samplers, for `sample` and `evaluate` alike."""
    add = parser.add_argument
    add("--eta", type=number_in(0, 1), default=None,
        help="fresh noise in [0, 1] of ddim (default 0: deterministic), euler-a and dpm++2m-sde "
             "(default 1); 1 adds DDPM's posterior variance β̃_t")
    add("--sigma-min", type=number_in(0, 1000, low_open=True), default=None,
        help="the smallest σ of the *-karras samplers (default: 0.2, where these models stop "
             "speckling; WebUI's is the table's smallest, 0.01)")
    add("--sde-noise", type=number_in(0, 10), default=0.0,
        help="a of a flow model's SDE, g_s = a·√(s/(1−s)) (II.11); 0: Euler (default: 0)")
    add("--variance", choices=["beta", "posterior"], default="beta",
        help="ddpm's step variance std_t²: beta (β_t, default) or posterior (β̃_t)")


def add_evaluate_flags(parser):
    add = parser.add_argument
    add_ckpt_flag(parser, "to evaluate")
    add("--guidance-scales", type=finite_numbers, default=None,
        help="comma-separated w values (default: 1, the model alone, and the checkpoint's "
             "own w, CFG's or an unconditional guide's)")
    add("--guidance-interval", type=interval, default=None,
        help="LO,HI: guide only where t/(T−1) lies in [LO, HI] (default: the checkpoint's)")
    add("--samplers", default=None,
        help="comma-separated sampler:steps, e.g. ddim:20,ddpm (default: the checkpoint's)")
    add("--classifier-scales", type=finite_numbers, default=None,
        help="comma-separated s of classifier guidance (II.9), a row each, every digit drawn "
             "(also from an unconditional model); default: none")
    add("--per-label", type=positive_int, default=100,
        help="samples of each class (default: 100; the README's headline rows use 1000, 10,000 "
             "samples for MNIST, where the floor is no longer small-sample bias)")
    add_sampler_option_flags(parser)
    add("--batch-size", type=positive_int, default=500, help="images drawn at once (default: 500)")


def add_show_flags(parser):
    add = parser.add_argument
    add_ckpt_flag(parser, "to draw")
    add("--out-dir", default="pictures", help="where the pictures go (default: pictures)")
    add("--label", default=None,
        help="the class a conditional model draws in the pictures, by index or name "
             "(default: 4, or the first class where there are fewer)")


def build_parser():
    parser = Parser(description="Diffusion in one file, on MNIST or your own pictures: DDPM, a "
                                "DiT with cross-attention, classifier-free guidance, and the "
                                "upgrades of Part II.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = Parser(add_help=False)
    add_common_flags(common)
    add_train_flags(commands.add_parser(
        "train", parents=[common], help="train a model (MNIST, or --data)",
        description="Train a DiT (or --arch unet) on MNIST, torchvision's sets or a folder of "
                    "your pictures; writes <out-dir>/ckpt.pt and a grid each epoch."))
    add_sample_flags(commands.add_parser(
        "sample", parents=[common], help="draw images from a checkpoint",
        description="Draw a grid; CFG with --guidance-scale, img2img with --init-image."))
    add_evaluate_flags(commands.add_parser(
        "evaluate", parents=[common], help="measure sample quality with a classifier",
        description="Label accuracy and Fréchet distance of samples, judged by a small CNN."))
    add_show_flags(commands.add_parser(
        "show", parents=[common], help="draw what the model does at each step",
        description="Pictures of the process: the noised input and the guess of x0, coarse "
                    "to fine (and a GIF), where the label acts, few steps, nearest neighbours, "
                    "and a latent model's latents."))
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
    """The networks' shape rules, said in the user's terms."""
    if config.image_size < 8:
        raise UserError(f"--image-size {config.image_size} is too small: 8 at least "
                        f"(evaluate's judge halves it three times)")
    if config.latent and config.image_size % config.latent_factor:
        raise UserError(f"--latent-factor {config.latent_factor} must divide the image size "
                        f"{config.image_size}")
    what = "latent" if config.latent else "image"
    config = network_config(config)  # the denoiser's input: the image, or the latent
    S, p, c = config.image_size, config.patch_size, config.unet_channels
    if config.arch == "unet" and S % 4:
        raise UserError(f"--arch unet halves its input twice, so its size must divide by 4; "
                        f"the {S}-pixel {what} does not (use an image size of "
                        f"{S - S % 4} or {S + 4 - S % 4} for pixels)")
    if config.arch == "unet" and (c % 8 or c % config.heads):
        raise UserError(f"--unet-channels {c} must be divisible by 8 (GroupNorm's groups) and "
                        f"by --heads {config.heads}")
    if config.arch == "dit" and S % p:
        divisors = ", ".join(str(k) for k in range(1, S + 1) if S % k == 0)
        raise UserError(f"--patch-size {p} does not divide the {S}-pixel {what}; use a "
                        f"--patch-size of {divisors}, or an --image-size divisible by {p}")
    if config.width % 4:
        raise UserError(f"--width {config.width} must be divisible by 4 (the 2-D position "
                        f"embedding gives a quarter of the channels to each sine and cosine)")
    if config.width % config.heads:
        raise UserError(f"--width {config.width} must be divisible by --heads {config.heads}")


def check_writable_folder(folder, flag):
    """Prove that the folder, or the nearest folder above it that exists, takes a file; create
    nothing (the work creates the folder when it first writes)."""
    existing = os.path.abspath(folder or ".")
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing):
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


# The three commands -------------------------------------------------------------------------

UPGRADE_FLAGS = ("conv_channels", "prediction", "t_sampling", "logsnr_mean", "logsnr_std",
                 "min_snr_gamma", "ema_decay", "objective", "schedule", "arch", "unet_channels",
                 "latent", "latent_channels", "latent_factor")



def vanilla_config(defaults):
    """Part I exactly: I.3's DiT, I.5's loss, no EMA, I.6's loop with CFG at every step."""
    return replace(defaults, vanilla=True, conv_channels=0, prediction="eps",
                   t_sampling="uniform", min_snr_gamma=0.0, ema_decay=0.0, clip_x0=False,
                   sampler="vanilla", sample_steps=defaults.num_timesteps, guidance_low=0.0,
                   guidance_high=1.0, guide_at=0.0)


def config_from_flags(args):
    given = {name: getattr(args, name) for name in UPGRADE_FLAGS
             if getattr(args, name) is not None}
    kind_defaults = Config() if args.cond else replace(Config(), **UNCONDITIONAL_DEFAULTS)
    per_kind = {name: getattr(args, name) for name in UNCONDITIONAL_DEFAULTS
                if getattr(args, name, None) is not None}
    defaults = replace(kind_defaults, cond=args.cond, batch_size=args.batch_size,
                       lr=args.lr or kind_defaults.lr,
                       label_drop=args.label_drop, warmup_steps=args.warmup_steps,
                       width=args.width, depth=args.depth, **per_kind)
    if args.vanilla:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise UserError(f"--vanilla trains exactly Part I; {flag} switches a Part II "
                            f"upgrade, so drop one of the two")
        return vanilla_config(defaults)
    if given.get("objective") == "flow":  # a flow model samples with Euler steps
        defaults = replace(defaults, sampler="euler", sample_steps=20)
    config = replace(defaults, **given)
    if config.latent:  # a latent is not in [−1, 1]: II.6's clamp would cut it
        config = replace(config, clip_x0=False)
    return config


def prepare_training(args, device, ckpt_path):
    """The config (the saved run's when resuming), the checkpoint to resume, and the seed."""
    if args.resume and args.overwrite:
        raise UserError("--resume continues the run in --out-dir and --overwrite starts over "
                        "there; give one of the two")
    if args.reflow_from and args.distill_from:
        raise UserError("--reflow-from and --distill-from each start from a teacher; give one")
    shaping = [name for name in ("vanilla", *UPGRADE_FLAGS)
               if getattr(args, name) not in (None, False)]
    if (args.reflow_from or args.distill_from) and shaping:
        raise UserError(f"a student takes its teacher's config; drop "
                        f"--{shaping[0].replace('_', '-')}")
    if args.resume:
        checkpoint, config = load_checkpoint(ckpt_path, device)
        if checkpoint.get("shipped"):
            raise UserError(f"{ckpt_path} is a shipped model (sampling weights only) and "
                            f"cannot be resumed; train your own with `train --cond`")
        if "generator" not in checkpoint:
            print(f"{ckpt_path} predates exact resume: its random state starts afresh", flush=True)
            checkpoint["generator"] = torch.Generator().manual_seed(args.seed).get_state()
        return config, checkpoint, checkpoint.get("seed", args.seed)
    if os.path.exists(ckpt_path) and not args.overwrite:
        raise UserError(f"{ckpt_path} already holds a run; continue it with --resume, start "
                        f"over with --overwrite, or choose another --out-dir")
    return config_from_flags(args), None, args.seed


def data_config(config, found, cond, patch_given):
    """A new run's config with the data it trains on: the set, its size, channels, classes; a
    latent model's default patch, the largest that divides the latent up to the pixel patch / f."""
    if cond and not found.class_names and found.data != "mnist":
        raise UserError(f"--cond learns classes, but {found.data} has no subfolders: put the "
                        f"pictures of each class in a subfolder of its own, or drop --cond")
    if cond and len(found.class_names) == 1:
        raise UserError(f"--cond needs two classes at least, but {found.data} has one class "
                        f"folder ({found.class_names[0]}); add another, or drop --cond")
    config = replace(config, data=found.data, image_size=found.size, channels=found.channels,
                     num_classes=found.num_classes, class_names=found.class_names)
    if config.latent and not patch_given:  # the latent is f times smaller
        side, f = found.size // config.latent_factor, config.latent_factor
        patch = max(k for k in range(1, max(1, config.patch_size // f) + 1) if side % k == 0)
        config = replace(config, patch_size=patch)
    return config


def distributed():
    """(rank, number of processes): torchrun sets RANK and WORLD_SIZE; a plain run is (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def process_device(device):
    """Under torchrun, a CUDA process takes the GPU of its LOCAL_RANK."""
    rank, world = distributed()
    if world > 1 and device == "mps":
        raise UserError("torchrun trains on CUDA GPUs (NCCL) or CPUs (gloo), not on MPS")
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def start_processes(device, batch_size):
    """Join torchrun's process group (nanoGPT's way); only rank 0 prints. A plain run never
    touches torch.distributed."""
    rank, world = distributed()
    if world == 1:
        return
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is the batch of all {world} processes "
                        f"together, so it must divide by {world}")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank:
        sys.stdout = open(os.devnull, "w")


def print_run_header(config, count, total_steps, device):
    kind = "conditional" if config.cond else "unconditional"
    kind = f"{kind} Part I (vanilla)" if config.vanilla else kind
    network = build_network(config)
    network = network.network if config.latent else network  # II.16: the denoiser inside
    kind += f" {type(network).__name__.replace('Conv', '')}"
    kind += " on the VAE's latents" if config.latent else ""
    size = sum(p.numel() for p in network.parameters()) / 1e6
    world = distributed()[1]
    where = f"{world} processes on {device.split(':')[0]}" if world > 1 else device
    S = config.image_size
    print(f"{kind}, {size:.2f} M parameters, objective {config.objective}, {count} images "
          f"of {config.channels}×{S}×{S}, {total_steps} steps of {config.batch_size} on {where}",
          flush=True)


def finish_processes():
    """Under torchrun: wait until rank 0 has saved, then leave the process group."""
    if distributed()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def pairs_set(teacher_path, count, out_dir, seed, device):
    """A flow checkpoint (the teacher), and II.17's coupled pairs of it as a DataSet whose
    decode() draws them, or reads them from <out-dir>/pairs.pt."""
    teacher = load_model(teacher_path, device)
    if teacher.config.objective != "flow":
        raise UserError(f"--reflow-from {teacher_path}: reflow straightens a flow, and this "
                        f"checkpoint was trained for DDPM; train one with --objective flow")
    config = teacher.config
    decode = lambda: drawn_pairs(teacher, count, out_dir, seed)
    return teacher, DataSet(config.data, config.channels, config.image_size, config.class_names,
                            count, decode)


def cached_pairs(path, shape, num_classes):
    """The pairs drawn so far (their count in "done"), or none yet; the classes in turn."""
    if not os.path.isfile(path):
        return {"noise": torch.zeros(shape), "images": torch.zeros(shape), "done": 0,
                "labels": torch.arange(shape[0]) % num_classes, "straightness": torch.zeros(
                    shape[0])}
    pairs = torch.load(path, weights_only=True)
    if len(pairs["labels"]) != shape[0]:
        raise UserError(f"{path} holds {len(pairs['labels'])} pairs, not --pairs {shape[0]}; "
                        f"delete it, or ask for {len(pairs['labels'])}")
    return pairs


def drawn_pairs(teacher, count, out_dir, seed, chunk=500):
    """(z, x = ODE(z)) from the teacher's own sampling (its sampler and steps, CFG with the
    classes in turn), `chunk` at a time with progress, cached at <out-dir>/pairs.pt after
    every chunk: an interrupted run draws only what is missing. Under torchrun, rank 0 draws."""
    (model, scheduler, config, guide, _), path = teacher, os.path.join(out_dir, "pairs.pt")
    shape, device = image_shape(config, count), next(model.parameters()).device
    pairs = cached_pairs(path, shape, config.num_classes)
    steps, clock = sampler_and_steps(config)[1], Clock(count, pairs["done"])
    sampling = Sampling(guidance_scale=default_guidance_scale(config), guide=guide)
    while distributed()[0] == 0 and pairs["done"] < count:
        first, size = pairs["done"], min(chunk, count - pairs["done"])
        z = gaussian_like(torch.empty(image_shape(config, size)),  # per chunk, on the CPU
                          torch.Generator().manual_seed(seed * 1_000_003 + first))
        labels = pairs["labels"][first:first + size].to(device)
        denoise, _ = guided_denoiser(model, scheduler, config, labels if config.cond else None,
                                     sampling)
        x, gaps = coupled_pairs(denoise, z.to(device), steps, config.num_timesteps)
        for name, value in (("noise", z), ("images", x), ("straightness", gaps)):
            pairs[name][first:first + size] = value.cpu()
        pairs["done"] += size
        durable_save(pairs, path)
        if clock.due(pairs["done"]):
            straightness = pairs["straightness"][:pairs["done"]].mean()
            clock.say(pairs["done"], f"  pairs {pairs['done']:,}/{count:,}, the teacher's "
                                     f"straightness {straightness:.4f}")
    if distributed()[1] > 1:
        dist.barrier()
        pairs = torch.load(path, weights_only=True)
    return Images(pairs["images"], pairs["labels"], config.class_names, pairs["noise"])


def distillation_teacher(path, device):
    """II.18's teacher, loaded: a DDPM checkpoint whose network reads as an image (v or x0)."""
    teacher = load_model(path, device)
    config, wrong = teacher.config, ""
    if config.objective == "flow":
        wrong = "is a flow model (reflow straightens a flow: --reflow-from)"
    elif config.distill_from:
        wrong = "is a consistency model already"
    elif config.prediction == "eps":
        wrong = ("predicts ε, whose image (x_t − √(1−ᾱ)·ε)/√ᾱ divides by √ᾱ ≈ 0.006 at "
                 "t = T−1; train it with --prediction v (the default)")
    if wrong:
        raise UserError(f"--distill-from {path}: consistency distillation needs a DDPM "
                        f"teacher that predicts v or x0, and this checkpoint {wrong}")
    return teacher


def file_digest(path):
    """The SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def same_teacher(config):
    """Whether a consistency model's teacher file (it exists) is the one it learnt from."""
    return not config.teacher_digest or file_digest(config.distill_from) == config.teacher_digest


def distilled(config, args):
    """A student's config: its teacher's, sampled by II.18's consistency sampling in one
    evaluation, with the teacher's guidance built in (w = 1)."""
    return replace(config, distill_from=os.path.abspath(args.distill_from),
                   teacher_digest=file_digest(args.distill_from),
                   lr=args.lr or DISTILLATION_LR, batch_size=args.batch_size,
                   consistency_steps=args.consistency_steps, epochs=args.epochs or config.epochs,
                   sampler="consistency", sample_steps=1, guidance_scale=1.0,
                   autoguidance_scale=1.0, guide_at=0.0)


def training_set(args, config, checkpoint, seed, device):
    """What a run trains on, found and checked but not decoded: the config with its data, the
    DataSet, the weights a new run starts from (a reflow's or a distillation's: its teacher's;
    else None) and II.18's teacher(x, t, labels) (or None)."""
    if checkpoint is None and args.reflow_from:  # II.17: the teacher's config and its pairs
        teacher, found = pairs_set(args.reflow_from, args.pairs, args.out_dir, seed, device)
        epochs = args.epochs or teacher.config.epochs
        config = replace(teacher.config, reflow_from=os.path.abspath(args.reflow_from),
                         pairs=args.pairs, epochs=epochs)
        return config, found, teacher.model.state_dict(), None
    if checkpoint is None and args.distill_from:  # II.18: the teacher's config and data
        teacher = distillation_teacher(args.distill_from, device)
        config, initial = distilled(teacher.config, args), teacher.model.state_dict()
    elif checkpoint is None:  # a new run: the data decides the image's shape and the classes
        found = find_data(args.data or "mnist", args.data_dir, True, args.image_size)
        config = data_config(config, found, args.cond, args.patch_size is not None)
        return config, found, None, None
    elif config.pairs:  # a reflow resumed: its pairs are cached in --out-dir
        return config, pairs_set(config.reflow_from, config.pairs, args.out_dir, seed,
                                 device)[1], None, None
    elif config.distill_from:  # a distillation resumed: its teacher again, the same file
        teacher, initial = distillation_teacher(config.distill_from, device), None
        if not same_teacher(config):
            raise UserError(f"cannot resume: the teacher {config.distill_from} is not the file "
                            f"this distillation started from (it was retrained or replaced); "
                            f"put it back, or start over with --overwrite")
    found = checked_data(config, args.data, args.data_dir, True)
    if not config.distill_from:
        return config, found, None, None
    model, scheduler, teacher_config, guide, _ = teacher
    return config, found, initial, guided_teacher(model, scheduler, teacher_config, guide)


def command_train(args):
    device = process_device(pick_device(args.device))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    config, checkpoint, seed = prepare_training(args, device, ckpt_path)
    config, found, initial, teacher = training_set(args, config, checkpoint, seed, device)
    check_model_shape(config)
    check_writable_folder(args.out_dir, "--out-dir")
    if config.batch_size > found.count:
        raise UserError(f"--batch-size {config.batch_size} is larger than the "
                        f"{found.count} training images")
    start_processes(device, config.batch_size)
    images = found.decode()
    if config.latent and checkpoint is None and initial is None:  # stage one: VAE, its scale
        vae, scale = trained_vae(config, images.pixels.to(device), args.out_dir)
        initial = {f"vae.{name}": value for name, value in vae.items()}
        config = replace(config, latent_scale=scale)
    total_steps = args.max_steps or config.epochs * (len(images) // config.batch_size)
    print_run_header(config, len(images), total_steps, device)
    rank, world = distributed()
    started = time.time()
    run = train(config, images.to(device), out_dir=args.out_dir, total_steps=total_steps,
                seed=seed, checkpoint=checkpoint, rank=rank, world=world, initial=initial,
                teacher=teacher)
    finish_processes()
    if run.step < total_steps:
        print(f"\ninterrupted at step {run.step}; saved {ckpt_path} (continue with --resume)")
        raise SystemExit(130)
    hint = f" --label {label_names(config)[0]}" if config.cond else ""
    hint = " --label 4" if config.cond and config.data == "mnist" else hint
    print(f"done in {format_seconds(time.time() - started)}; sample with "
          f"`python vanilla_diffusion.py sample --ckpt {ckpt_path}{hint}`", flush=True)


def label_index(text, config, flag="--label"):
    """A class given by its index or its name."""
    names = label_names(config)
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    listed = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
    raise UserError(f"{flag} {text!r} is not one of the model's classes: {listed}")


def sample_labels(args, config, device):
    """The labels to draw and the grid's row length."""
    if not (config.cond or args.classifier_scale):  # nothing can be told which class to draw
        return None, math.ceil(math.sqrt(args.n))
    if args.label is None:  # a label-guided model with no --label: one row per class
        return torch.arange(config.num_classes, device=device).repeat_interleave(args.n), args.n
    return torch.full((args.n,), args.label, device=device), math.ceil(math.sqrt(args.n))


def check_distilled_guidance(config, scales, negative_label=None):
    """A consistency model (II.18) has its teacher's guidance built in: w = 1, one pass."""
    if config.distill_from and (any(w != 1 for w in scales or []) or negative_label is not None):
        raise UserError("a consistency model learnt its teacher's guided map, and has no ∅ "
                        "branch of its own: drop --guidance-scale(s) and --negative-label")


def check_classifier_guidance(flag, config, samplers):
    """II.9 steers a DDPM checkpoint's Part II samplers: its classifier reads noise_image's x_t
    (not a flow model's x_s), and Part I's loop takes no guide but CFG."""
    if config.objective == "flow" or config.latent or {"vanilla", "consistency"} & set(samplers):
        raise UserError(f"{flag} needs a DDPM checkpoint in pixels and a Part II sampler (its "
                        f"classifier reads noise_image's x_t of pixels, not a flow model's x_s "
                        f"nor a latent; vanilla and consistency take none)")


NOISY_SAMPLERS = ("ddim", "euler-a", "euler-a-karras", "dpm++2m-sde", "dpm++2m-sde-karras")


def check_sampler_options(args, config, samplers):
    """--eta, --sigma-min, --sde-noise and --variance each belong to some samplers only."""
    rules = [("--eta", args.eta is not None, lambda name: name in NOISY_SAMPLERS,
              f"a sampler that adds fresh noise ({', '.join(NOISY_SAMPLERS)})"),
             ("--sigma-min", args.sigma_min is not None, lambda name: name.endswith("-karras"),
              "a *-karras sampler"),
             ("--sde-noise", args.sde_noise > 0, lambda name: config.objective == "flow",
              "a checkpoint trained with --objective flow"),
             ("--variance", args.variance != "beta", lambda name: name == "ddpm", "--sampler ddpm")]
    for flag, given, fits, needs in rules:  # samplers that do not take it ignore it
        if given and not any(fits(name) for name in samplers):
            raise UserError(f"{flag} needs {needs} (got {', '.join(samplers)})")


def sampling_options(args):
    """The Sampling fields that the sampler-option flags set (a flag not given keeps the
    field's default)."""
    options = dict(eta=args.eta, sigma_min=args.sigma_min, sde_noise=args.sde_noise,
                   variance=args.variance)
    return {name: value for name, value in options.items() if value is not None}


def check_sample_flags(args, config, sampler):
    """Every sample flag against the checkpoint; --label and --negative-label become indices."""
    named = ((args.label, "--label"), (args.negative_label, "--negative-label"))
    args.label, args.negative_label = (None if text is None else label_index(text, config, flag)
                                       for text, flag in named)
    if args.label is not None and not (config.cond or args.classifier_scale):
        raise UserError(f"{args.ckpt} is an unconditional model; drop --label, or steer it "
                        f"with --classifier-scale (classifier guidance)")
    if args.classifier_scale:
        check_classifier_guidance("--classifier-scale", config, [sampler])
    if args.negative_label is not None and (not config.cond or args.label is None):
        raise UserError("--negative-label needs a conditional checkpoint and a --label")
    several = args.guidance_scale and len(args.guidance_scale) > 1
    if several and (config.cond or args.classifier_scale) and args.label is None:
        raise UserError("several --guidance-scale values draw one row per scale; "
                        "give a --label too")
    check_sampler_options(args, config, [sampler])
    check_distilled_guidance(config, args.guidance_scale, args.negative_label)
    part_two = {"--negative-label": args.negative_label is not None, "--gif": args.gif,
                "--init-image": args.init_image, "--guidance-interval": args.guidance_interval}
    for flag, given in part_two.items():
        if sampler == "vanilla" and given:
            raise UserError(f"{flag} is a Part II feature; Part I's loop (--sampler vanilla) "
                            f"takes none: add --sampler ddpm")
    check_picture_path(args.output, "--output", image_extensions())
    if args.gif:
        check_picture_path(args.gif, "--gif", [".gif"])


def train_and_test_images(args, config, device):
    """A function that loads the checkpoint's data (or --data) as (train, test) Images, once,
    when first asked; a folder has no test split, so its test set is its training set."""
    loaded = []
    images = lambda train: checked_data(config, args.data, args.data_dir, train).decode()

    def load():
        if not loaded:
            train = images(True).to(device)
            a_folder = (args.data or config.data) not in DATASETS
            loaded.extend([train, train if a_folder else images(False).to(device)])
        return tuple(loaded)
    return load


def noisy_classifier_for(args, scale, scheduler, config, data, device):
    """The noisy classifier cached beside the checkpoint, if classifier guidance is asked for;
    data: train_and_test_images's loader."""
    if not scale:
        return None
    path = os.path.join(cache_folder(args.ckpt), "noisy_classifier.pt")
    return get_noisy_classifier(path, scheduler, config, data, device)


def load_init_image(path, config):
    """A picture for image-to-image in the model's channels and size (shorter side resized,
    centre-cropped, as the data is), as [1, C, S, S] in [−1, 1]."""
    if not os.path.isfile(path):
        raise UserError(f"no init image at {path}")
    try:
        from PIL import Image
        with Image.open(path) as picture:
            pixels = picture_to_pixels(picture, config.channels, config.image_size)
    except Exception as error:
        raise UserError(f"could not read {path} as an image ({first_line(error)})") from None
    return as_x0(pixels[None])


def command_sample(args):
    device = pick_device(args.device)
    model, scheduler, config, guide, _ = load_model(args.ckpt, device)
    sampler, steps = sampler_and_steps(config, args.sampler, args.steps)
    check_sample_flags(args, config, sampler)
    labels, nrow = sample_labels(args, config, device)
    count = args.n if labels is None else len(labels)
    negative = None if args.negative_label is None else torch.full_like(labels, args.negative_label)
    init, strength = None, 1.0  # strength 1: start from pure noise
    if args.init_image:
        init = load_init_image(args.init_image, config).to(device)
        init, strength = init.expand(count, -1, -1, -1), args.strength
    sampling = dict(sampler=sampler, steps=steps, negative_labels=negative, init_images=init,
                    strength=strength, guidance_interval=args.guidance_interval, guide=guide,
                    **sampling_options(args), classifier_scale=args.classifier_scale,
                    classifier=noisy_classifier_for(args, args.classifier_scale, scheduler, config,
                                                    train_and_test_images(args, config, device),
                                                    device))
    scales = args.guidance_scale or [default_guidance_scale(config)]
    rows, frames = [], []
    for guidance_scale in scales:  # one seed for every scale: each column starts from one noise
        frames.append([] if args.gif else None)
        rows.append(generate(model, scheduler, config, labels, shape=image_shape(config, count),
                             guidance_scale=guidance_scale, frames=frames[-1],
                             generator=torch.Generator().manual_seed(args.seed), **sampling))
    nrow = nrow if len(scales) == 1 else args.n
    save_grid(torch.cat(rows), args.output, nrow=nrow)
    evaluations = network_evaluations(sampler, steps)
    print(f"wrote {args.output} ({count * len(scales)} images, {sampler} with {evaluations} "
          f"network evaluations)")
    if args.gif:
        steps = spread([torch.cat(step) for step in zip(*frames)], 60)  # a grid each step
        save_gif([as_picture(step, nrow, scale=1, pad_value=0) for step in steps], args.gif)
        print(f"wrote {args.gif}")


def print_straightness(model, scheduler, config, guide, seed, count=200):
    """II.17's straightness of a flow checkpoint's paths under its own sampling."""
    device = next(model.parameters()).device
    labels = torch.arange(count, device=device) % config.num_classes if config.cond else None
    sampling = Sampling(guidance_scale=default_guidance_scale(config), guide=guide)
    denoise, _ = guided_denoiser(model, scheduler, config, labels, sampling)
    noise = gaussian_like(torch.empty(image_shape(config, count)),
                          torch.Generator().manual_seed(seed)).to(device)
    steps = sampler_and_steps(config)[1]
    gaps = coupled_pairs(denoise, noise, steps, config.num_timesteps)[1]
    print(f"straightness of {count} paths (Euler {steps}; 0: straight): {gaps.mean():.4f}")


def parse_sampler_settings(text, config):
    """"ddim:20,ddpm" → [("ddim", 20), ("ddpm", T)], each checked against the checkpoint;
    none: the checkpoint's."""
    settings = []
    for item in filter(None, (text or "").split(",")):
        name, _, steps = item.partition(":")
        if steps and not steps.isdigit():
            raise UserError(f"--samplers takes sampler:steps items such as ddim:20,ddpm; "
                            f"got {item!r}")
        settings.append(sampler_and_steps(config, name, int(steps) if steps else None))
    return settings or [sampler_and_steps(config)]


def command_evaluate(args):
    device = pick_device(args.device)
    model, scheduler, config, guide, state = load_model(args.ckpt, device)
    settings = parse_sampler_settings(args.samplers, config)
    check_sampler_options(args, config, [name for name, _ in settings])
    check_distilled_guidance(config, args.guidance_scales)
    if args.classifier_scales:
        check_classifier_guidance("--classifier-scales", config, [name for name, _ in settings])
    data = args.data or config.data
    if config.num_classes < 2:
        raise UserError(f"evaluate judges samples with a classifier of the data's classes, but "
                        f"{data} has none (no subfolders)")
    images = train_and_test_images(args, config, device)
    judge = "mnist" if data == "mnist" and config.image_size == 28 else (
        f"{os.path.basename(os.path.abspath(data))}_{config.image_size}")
    classifier = get_classifier(os.path.join(cache_folder(args.ckpt), f"{judge}_classifier.pt"),
                                config, images, device)
    noisy_classifier = noisy_classifier_for(args, any(args.classifier_scales or []), scheduler,
                                            config, images, device)
    guidance_interval = args.guidance_interval or (config.guidance_low, config.guidance_high)
    if config.objective == "flow":
        print_straightness(model, scheduler, config, guide, args.seed)
    own = default_guidance_scale(config)  # w = 1: the model alone; then as `sample` draws
    guided = own != 1 and (config.cond or guide is not None)
    scales = args.guidance_scales or [1.0] + ([own] if guided else [])
    print(f"checkpoint {args.ckpt}: step {state['step']}, objective {config.objective}; "
          f"{args.per_label * config.num_classes} samples per setting; guidance where t/(T−1) ∈ "
          f"[{guidance_interval[0]:g}, {guidance_interval[1]:g}]")
    evaluate(model, scheduler, config, classifier, images(), settings=settings,
             guidance_scales=scales, per_label=args.per_label, batch_size=args.batch_size,
             seed=args.seed, guidance_interval=guidance_interval, guide=guide,
             noisy_classifier=noisy_classifier, classifier_scales=args.classifier_scales,
             options=sampling_options(args))


def command_show(args):
    device = pick_device(args.device)
    model, scheduler, config, guide, _ = load_model(args.ckpt, device)
    if args.label is not None and not config.cond:
        raise UserError(f"{args.ckpt} is an unconditional model; its pictures take no --label")
    label = 4 if config.num_classes > 4 else 0
    label = label if args.label is None else label_index(args.label, config)
    check_writable_folder(args.out_dir, "--out-dir")
    train_images, test_images = train_and_test_images(args, config, device)()
    started = time.time()
    labels = torch.full((4,), label, device=device) if config.cond else None
    scene = Scene(model, scheduler, config, guide, labels, args.out_dir, args.seed)
    a_folder = test_images is train_images  # a folder has no test split
    real = train_images if a_folder else test_images
    written = [draw_what_the_network_sees(scene, real.pixels[:4], real.labels[:4]),
               *draw_coarse_to_fine(scene), *draw_where_the_label_acts(scene),
               draw_few_steps(scene),
               draw_is_it_copying(scene, train_images.pixels, None if a_folder else
                                  test_images.pixels),
               *(draw_the_latents(scene, real.pixels) if config.latent else [])]
    print(f"wrote {len(written)} pictures in {format_seconds(time.time() - started)}: "
          + ", ".join(written))


def checkpoint_to_use(ckpt):
    """--ckpt as given; without it runs/ckpt.pt, or the shipped conditional model (said once)."""
    if ckpt is not None or os.path.isfile(DEFAULT_CKPT):
        return ckpt or DEFAULT_CKPT
    shipped = SHIPPED_MODELS["conditional"]
    print(f"no {DEFAULT_CKPT} yet: using the shipped model {shown_path(shipped)} (train your "
          f"own with `python vanilla_diffusion.py train --cond`)", flush=True)
    return shipped


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command != "train":
        args.ckpt = checkpoint_to_use(args.ckpt)
    commands = {"train": command_train, "sample": command_sample, "evaluate": command_evaluate,
                "show": command_show}
    try:
        commands[args.command](args)
    except UserError as error:
        if distributed()[0] == 0:  # under torchrun every rank finds it; one says it
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
