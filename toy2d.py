"""Policy-Guided Diffusion on a 2-D toy problem (Jackson et al., 2024, arXiv 2404.06356, Figures 2 and 3), on a CPU.

A point agent starts at one location; its position moves by `step_size * action` (actions in [-1, 1]^2, positions
clipped to a box, episodes of `episode_steps`; `--current` adds a downward current in the right half of the world).
A noisy scripted *behaviour* policy heads to goal A and collects a small offline dataset; the *target* policy is a
Gaussian heading to goal B. We then generate synthetic trajectories for the target policy in four ways and compare
them with the target policy's real rollouts:

1. a truncated autoregressive world model (ensemble of MLPs predicting the state change, k-step rollouts of the target
   policy from dataset states; also full-horizon rollouts from the start state, where its errors can compound);
2. unguided trajectory diffusion (the shared EDM diffuser and sampler, guidance coefficient 0);
3. policy-guided diffusion over a sweep of guidance coefficients lambda.

Metrics per method (printed as a table and saved to `metrics.json`): mean target-policy action log-likelihood, dynamics
error ||s'_synthetic - f(s, a)|| under the true dynamics f, open-loop drift (the last synthetic state against the true
state reached by replaying the synthetic actions from the synthetic first state), and end-point distances to goals A/B.
Figures (`toy2d_panel.png` like Figure 2, `toy2d_sweep.png` like Figure 3, `toy2d.png` both) go to the run dir.

Usage: python toy2d.py            (about 2.5 minutes on 2 CPU cores; phases and their times are printed as they end)
       python toy2d.py --quick    (tiny, for tests)
Blocks between `# SHARED BEGIN: x` and `# SHARED END: x` are word for word those of pgd_iql.py (tools/sync_shared.py).
"""
# SHARED BEGIN: imports
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# SHARED END: imports
import shutil  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (dataset, networks, sampler noise, rollouts)"""
    device: str = "cpu"
    """torch device (the toy is sized for a CPU)"""
    num_threads: int = 0
    """torch CPU threads (0: torch's default, one per core; 1 when another job shares the CPU)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    runs_root: str = "runs"
    """folder for the run directories `{runs_root}/toy2d__{exp}__{seed}__{time}`"""
    quick: bool = False
    """if toggled, fields still at their defaults take the tiny values of QUICK (a smoke test in well under a minute)"""
    docs_figure: Optional[str] = None
    """if set, also copy the combined figure here (e.g. `docs/toy2d.png`)"""

    # Environment and policies
    episode_steps: int = 40
    """episode length cap of the toy environment"""
    step_size: float = 0.1
    """dynamics: s' = clip(s + step_size * (clip(a, -1, 1) + w(s)), -box, box), w the current below"""
    current: float = 0.0
    """strength c of a downward current w(s) = (0, -c sigmoid((x - 0.1) / 0.1)) in the right half (see README)"""
    box: float = 1.5
    """positions are clipped to [-box, box]^2"""
    start: tuple[float, float] = (0.0, 0.0)
    """start location of every episode"""
    start_noise: float = 0.03
    """std of the Gaussian noise added to the start location"""
    goal_a: tuple[float, float] = (-0.5, 0.8)
    """goal of the behaviour policy (the dataset)"""
    goal_b: tuple[float, float] = (0.5, 0.8)
    """goal of the target policy"""
    policy_gain: float = 3.0
    """both policies' mean action is tanh(policy_gain * (goal - s))"""
    behaviour_noise: float = 0.5
    """behaviour action = tanh(policy_gain * (goal_a + offset - s) + behaviour_noise * N(0, I)), noise per step"""
    behaviour_goal_std: float = 0.5
    """std of the behaviour policy's per-episode goal offset (offset ~ N(0, std^2 I)): how widely the data fans out"""
    target_std: float = 0.2
    """target policy: a ~ N(tanh(policy_gain * (goal_b - s)), target_std^2 I)"""
    num_episodes: int = 500
    """behaviour episodes in the offline dataset"""

    # Data windows (names read by the shared diffuser code)
    horizon: int = 32
    """length of the trajectory windows the diffuser models (<= episode_steps)"""
    window_stride: int = 8
    """stride between windows of an episode (8 with the defaults: one window per episode, from its start)"""
    val_fraction: float = 0.05
    """fraction of episodes held out for the diffuser's validation loss"""

    # Diffuser (EDM, 1-D temporal U-Net; names read by the shared diffuser code)
    unet: Literal["residual", "plain"] = "residual"
    """U-Net type: `residual` (two residual blocks per level, this harness) or `plain` (the official conv U-Net)"""
    diffuser_channels: int = 32
    """U-Net width (features of the first level)"""
    diffuser_mults: tuple[int, ...] = (1, 2, 2)
    """U-Net channel multiplier per level (one level per entry)"""
    diffuser_kernel_size: int = 3
    """temporal convolution kernel size"""
    diffuser_steps: int = 2000
    """diffuser training steps (ignored when --diffuser-epochs > 0)"""
    diffuser_epochs: int = 0
    """if > 0, train for this many passes over the training windows (each len(windows) // batch steps) instead"""
    diffuser_batch_size: int = 64
    """diffuser batch size (windows)"""
    diffuser_lr: float = 1e-3
    """diffuser peak learning rate (Adam; linear warmup then cosine decay)"""
    diffuser_warmup: float = 0.1
    """fraction of the training steps spent warming the learning rate up"""
    diffuser_warmup_start: float = 0.0
    """learning rate at the first warmup step, as a fraction of the peak"""
    ema_decay: float = 0.995
    """EMA decay of the diffuser weights used for sampling"""
    ema_every: int = 1
    """update the EMA weights every this many training steps"""
    sigma_data: float = 1.0
    """EDM sigma_data (Table 1); the data is z-scored per channel, so its std is 1"""
    P_mean: float = -1.2
    """EDM training noise distribution: ln(sigma) ~ N(P_mean, P_std^2)"""
    P_std: float = 1.2
    """EDM training noise distribution: ln(sigma) ~ N(P_mean, P_std^2)"""

    # Guided EDM sampler (names read by the shared sampler code)
    sampler_steps: int = 128
    """Heun steps of the EDM sampler (guided one-step dynamics error ~0.07 at 32 steps, ~0.03 at 128; see README)"""
    sigma_min: float = 0.002
    """smallest noise level of the Karras schedule"""
    sigma_max: float = 80.0
    """largest noise level of the Karras schedule"""
    rho: float = 7.0
    """Karras schedule exponent (EDM Eq. 5)"""
    S_churn: float = 80.0
    """EDM stochasticity (Algorithm 2)"""
    S_tmin: float = 0.05
    """churn only for sigma in [S_tmin, S_tmax]"""
    S_tmax: float = 50.0
    """churn only for sigma in [S_tmin, S_tmax]"""
    S_noise: float = 1.003
    """churn noise inflation"""
    euler_from_churned: bool = True
    """take the Euler step from the churned point x_hat (EDM Algorithm 2); off: from the pre-churn x, as the official code"""
    guidance_coef: float = 16.0
    """policy-guidance coefficient lambda of the 'policy-guided diffusion' panel of the Figure 2 plot"""
    guidance_sweep: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0, 16.0)
    """guidance coefficients of the lambda sweep (Figure 3 plot); 0 is unguided diffusion"""
    guidance_cosine: float = 0.3
    """c in lambda_i = coef * (1 - i/N + c * sin(pi (i+1) / N))"""
    normalize_guidance: bool = True
    """divide the guidance gradient by its norm per trajectory, g / (||g|| + 1e-8), so coef is a step length (official: off)"""
    guide_on_denoised: bool = True
    """evaluate the policy gradient at the denoised estimate D(x; sigma) (one more network call) instead of the noisy sample"""
    num_samples: int = 128
    """diffusion samples per guidance coefficient (the run's main cost: 3 network calls per sampler step)"""
    reference_samples: int = 512
    """trajectories of each reference row: real target-policy rollouts, behaviour episodes (at most the training
    episodes there are) and world-model rollouts; cheap, so more than --num-samples for a steadier baseline"""
    sampler_bf16: bool = False
    """run the denoiser's network F in bfloat16 autocast while sampling (the EDM skip path and guidance stay float32)"""
    compile: bool = False
    """torch.compile the sampler step and the diffuser's training step"""

    # World-model baseline
    wm_ensemble: int = 5
    """ensemble members (each on its own bootstrap of the transitions; rollouts pick a member per step)"""
    wm_hidden: int = 64
    """hidden width of the world-model MLPs (two hidden layers)"""
    wm_steps: int = 1500
    """world-model training steps (Adam, batch 256)"""
    wm_lr: float = 1e-3
    """world-model learning rate"""
    wm_rollout_length: int = 8
    """k of the truncated world-model rollouts from dataset states"""
    plot_trajectories: int = 48
    """trajectories drawn per panel"""


QUICK = dict(num_episodes=200, diffuser_steps=400, sampler_steps=16, num_samples=64,
             reference_samples=128, wm_steps=300, guidance_sweep=(0.0, 1.0, 2.0, 4.0), guidance_coef=4.0,
             plot_trajectories=24)


# SHARED BEGIN: validation
def check_ranges(args, ranges: dict[str, str]):
    """Stop with one line naming the first field outside its interval (e.g. `[1, inf)`, `(0, 1)`; every entry of a tuple
    field); NaN never passes; None (a field still to be resolved from another) is skipped."""
    for name, interval in ranges.items():
        low, high = (float(b) for b in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in (value if isinstance(value, (tuple, list)) else () if value is None else (value,)):
            above = v >= low if interval[0] == "[" else v > low
            below = v <= high if interval[-1] == "]" else v < high
            if not (above and below):
                raise SystemExit(f"error: --{name.replace('_', '-')} {value} is outside its valid range {interval}")


# SHARED END: validation


# SHARED BEGIN: datasets
ACTION_CLIP = 1 - 1e-3  # actions are clipped to +-ACTION_CLIP before arctanh, so the diffused channel stays finite


def transitions_from_episodes(episodes: list[dict]) -> dict[str, np.ndarray]:
    """All real transitions (s, a, r, s', done) of the dataset."""
    cat = lambda key: np.concatenate([e[key] for e in episodes])  # noqa: E731
    return dict(obs=np.concatenate([e["obs"][:-1] for e in episodes]), actions=cat("actions"), rewards=cat("rewards"),
                next_obs=np.concatenate([e["obs"][1:] for e in episodes]), dones=cat("terminals"))


class Normalizer(nn.Module):
    """Per-channel z-scoring of the diffused windows."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @classmethod
    def fit(cls, windows: np.ndarray) -> "Normalizer":
        flat = torch.as_tensor(windows).reshape(-1, windows.shape[-1])
        return cls(flat.mean(0), flat.std(0).clamp(min=1e-3))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


# SHARED END: datasets


# SHARED BEGIN: windows
def make_windows(episodes: list[dict], horizon: int, stride: int) -> np.ndarray:
    """Sub-trajectory windows [N, horizon, obs_dim + act_dim + 2] of rows [obs_t, arctanh(a_t), r_t, terminal_t].

    Windows never cross an episode end. A window may end on a terminal (that last row still makes a transition, its
    next state being irrelevant); windows whose last row is a timeout are dropped (that row's successor is unknown).
    Terminated episodes always contribute the window that ends on the terminal."""
    windows = []
    for e in episodes:
        T = len(e["actions"])
        if T < horizon:
            continue
        rows = np.concatenate([e["obs"][:T], np.arctanh(np.clip(e["actions"], -ACTION_CLIP, ACTION_CLIP)),
                               e["rewards"][:, None], e["terminals"][:, None]], 1)
        starts = list(range(0, T - horizon + 1, stride))
        if e["terminals"][-1] and starts[-1] != T - horizon:
            starts.append(T - horizon)
        if e["timeouts"][-1] and starts[-1] == T - horizon:
            starts.pop()
        windows += [rows[s:s + horizon] for s in starts]
    if not windows:
        raise SystemExit(f"error: no episode is at least --horizon {horizon} steps long; lower --horizon")
    return np.stack(windows).astype(np.float32)


# SHARED END: windows


# SHARED BEGIN: diffuser
class SigmaEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise = ln(sigma)/4 followed by an MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(dim // 2) / (dim // 2)) * 1000)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, 4 * dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs
        return self.mlp(torch.cat([angles.sin(), angles.cos()], -1))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, kernel_size: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(min(8, c_in), c_in), nn.GroupNorm(min(8, c_out), c_out)
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, padding=kernel_size // 2)
        self.emb = nn.Linear(emb_dim, c_out)
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class TemporalUNet(nn.Module):
    """1-D U-Net over time: [B, H, C] -> [B, H, C]; two residual blocks per level, skip connections per level. Any H:
    a level halves the length (rounding up) and the way back resizes to the skip connection's length."""

    def __init__(self, data_dim: int, channels: int, mults: tuple[int, ...], kernel_size: int):
        super().__init__()
        dims = [channels * m for m in mults]
        emb_dim = 4 * channels
        self.embed = SigmaEmbedding(channels)
        self.inp = nn.Conv1d(data_dim, channels, kernel_size, padding=kernel_size // 2)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        c_prev = channels
        for i, c in enumerate(dims):
            self.down.append(nn.ModuleList([ResidualBlock(c_prev, c, emb_dim, kernel_size),
                                            ResidualBlock(c, c, emb_dim, kernel_size),
                                            nn.Conv1d(c, c, 3, stride=2, padding=1) if i < len(dims) - 1 else nn.Identity()]))
            c_prev = c
        self.mid = nn.ModuleList([ResidualBlock(c_prev, c_prev, emb_dim, kernel_size) for _ in range(2)])
        for i, c in reversed(list(enumerate(dims))):
            c_next = dims[i - 1] if i > 0 else channels
            self.up.append(nn.ModuleList([ResidualBlock(2 * c, c, emb_dim, kernel_size),
                                          ResidualBlock(c, c_next, emb_dim, kernel_size)]))
        self.out = nn.Sequential(nn.GroupNorm(min(8, channels), channels), nn.SiLU(),
                                 nn.Conv1d(channels, data_dim, kernel_size, padding=kernel_size // 2))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        emb = self.embed(c_noise)
        h = self.inp(x.transpose(1, 2))
        skips = []
        for block1, block2, downsample in self.down:
            h = block2(block1(h, emb), emb)
            skips.append(h)
            h = downsample(h)
        for block in self.mid:
            h = block(h, emb)
        for block1, block2 in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-1], mode="nearest") if h.shape[-1] != skip.shape[-1] else h
            h = block2(block1(torch.cat([h, skip], 1), emb), emb)
        return self.out(h).transpose(1, 2)


class PlainUNet(nn.Module):
    """The official code's U-Net (its models/diffusion.py): per level a conv, plus the sigma embedding, then
    GroupNorm-ReLU-conv-GroupNorm-ReLU; max-pooling down; up: nearest resize to the skip's length, a conv of kernel 2
    ("same" padding: one zero on the right) plus the embedding, GroupNorm-ReLU, concatenation with the skip, two
    conv-GroupNorm-ReLU; a 1x1 conv out. No residual connections, PyTorch's default initialisation. Any H."""

    def __init__(self, data_dim: int, channels: int, mults: tuple[int, ...], kernel_size: int):
        super().__init__()
        dims = [channels * m for m in mults]
        half = channels // 8
        self.register_buffer("freqs", torch.exp(-math.log(10_000) / max(1, half - 1) * torch.arange(half)))
        self.embed = nn.Sequential(nn.Linear(2 * half, channels), nn.SiLU(), nn.Linear(channels, channels))

        def conv(c_in: int, c_out: int, k: int = kernel_size) -> nn.Conv1d:
            return nn.Conv1d(c_in, c_out, k, padding=k // 2 if k % 2 else 0)  # kernel 2: padded (0, 1) in forward

        def norm_relu(c: int) -> list[nn.Module]:
            return [nn.GroupNorm(8, c), nn.ReLU()]

        self.down, self.up, c_prev = nn.ModuleList(), nn.ModuleList(), data_dim
        for c in dims:
            self.down.append(nn.ModuleList([conv(c_prev, c), nn.Linear(channels, c),
                                            nn.Sequential(*norm_relu(c), conv(c, c), *norm_relu(c))]))
            c_prev = c
        for c in reversed(dims[:-1]):
            self.up.append(nn.ModuleList([conv(c_prev, c, 2), nn.Linear(channels, c), nn.Sequential(*norm_relu(c)),
                                          nn.Sequential(conv(2 * c, c), *norm_relu(c), conv(c, c), *norm_relu(c))]))
            c_prev = c
        self.out = nn.Conv1d(c_prev, data_dim, 1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs
        t = F.silu(self.embed(torch.cat([angles.sin(), angles.cos()], -1)))
        h, skips = x.transpose(1, 2), []
        for i, (conv_in, emb, rest) in enumerate(self.down):
            h = rest(conv_in(h) + emb(t)[:, :, None])
            skips.append(h)
            h = F.max_pool1d(h, 2) if i < len(self.down) - 1 else h
        skips.pop()
        for conv_up, emb, norm, rest in self.up:
            skip = skips.pop()
            h = norm(conv_up(F.pad(F.interpolate(h, size=skip.shape[-1], mode="nearest"), (0, 1))) + emb(t)[:, :, None])
            h = rest(torch.cat([h, skip], 1))
        return self.out(h).transpose(1, 2)


class EDMDenoiser(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with the preconditioning of EDM Table 1. With
    `clean_known_input`, the entries marked `known` (inpainting conditioning: given clean) enter F as they are, not
    scaled by c_in = 1 / sqrt(sigma^2 + sigma_data^2), so F reads them at every noise level (dydiff_td3bc.py)."""

    def __init__(self, net: nn.Module, sigma_data: float, clean_known_input: bool = False):
        super().__init__()
        self.net, self.sigma_data, self.clean_known_input = net, sigma_data, clean_known_input

    def preconditioning(self, sigma: torch.Tensor):
        sd2, s2 = self.sigma_data ** 2, sigma ** 2
        c_skip = sd2 / (s2 + sd2)
        c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, known: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = sigma.reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        c_skip, c_out, c_in = (c[:, None, None] for c in (c_skip, c_out, c_in))
        net_in = torch.where(known, x, c_in * x) if known is not None and self.clean_known_input else c_in * x
        return c_skip * x + c_out * self.net(net_in, c_noise)


def edm_loss(denoiser: EDMDenoiser, x: torch.Tensor, P_mean: float, P_std: float, noise=None, rnd_normal=None,
             known: Optional[torch.Tensor] = None):
    """EDM training loss: ln(sigma) ~ N(P_mean, P_std^2), weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    `known` (bool, broadcastable to x): entries given to the network clean instead of noised (inpainting conditioning,
    as DyDiff trains its action-conditioned model); the loss still covers every entry."""
    rnd_normal = torch.randn(x.shape[0], device=x.device) if rnd_normal is None else rnd_normal
    noise = torch.randn_like(x) if noise is None else noise
    sigma = (rnd_normal * P_std + P_mean).exp()
    sd = denoiser.sigma_data
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    noisy = x + noise * sigma[:, None, None]
    denoised = denoiser(noisy if known is None else torch.where(known, x, noisy), sigma, known)
    return (weight[:, None, None] * (denoised - x) ** 2).mean()


DIFFUSER_FIELDS = ("horizon", "window_stride", "val_fraction", "unet", "diffuser_channels", "diffuser_mults",
                   "diffuser_kernel_size", "diffuser_steps", "diffuser_epochs", "diffuser_batch_size", "diffuser_lr",
                   "diffuser_warmup", "diffuser_warmup_start", "ema_decay", "ema_every", "sigma_data", "P_mean", "P_std",
                   "seed")


UNETS = {"residual": TemporalUNet, "plain": PlainUNet}


def build_denoiser(config: dict, data_dim: int) -> EDMDenoiser:
    unet = UNETS[config.get("unet", "residual")]
    net = unet(data_dim, config["diffuser_channels"], tuple(config["diffuser_mults"]), config["diffuser_kernel_size"])
    return EDMDenoiser(net, config["sigma_data"], config.get("clean_known_input", False))


def atomic_torch_save(obj, path: str):
    """Write to a temporary file next to `path`, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# SHARED END: diffuser


# SHARED BEGIN: compiled_adam
import warnings  # noqa: E402  (late imports: only the scripts that train carry this block)
from torch.optim.adam import adam as functional_adam  # noqa: E402


def adam_step(optimizer: torch.optim.Adam, loss: torch.Tensor):
    """One Adam step of `loss` on the optimiser's parameters (gradients by torch.autograd.grad, so only those get any).
    Eager: torch's Adam.step(), the same arithmetic as zero_grad/backward/step. Inside a step compiled by compile_step:
    the functional torch.optim.adam.adam on the optimiser's own state tensors, which torch.compile captures in the
    step's one graph (Adam.step() itself graph-breaks)."""
    params = optimizer.param_groups[0]["params"]
    grads = torch.autograd.grad(loss, params)
    if not torch.compiler.is_compiling():
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    group, state = optimizer.param_groups[0], [optimizer.state[p] for p in params]
    with torch.no_grad():
        functional_adam(params, list(grads), [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state], [],
                        [s["step"] for s in state], foreach=True, capturable=True, amsgrad=False,
                        beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def compile_step(fn: Callable, optimizers: list[torch.optim.Optimizer], device: torch.device) -> Callable:
    """`fn` (tensors in, tensors out; its optimiser steps by adam_step) compiled whole into one graph: forward,
    gradients, Adam; CUDA graphs on CUDA (mode reduce-overhead). The optimisers' state is made up front (a lazily made
    state cannot be captured), on the parameters' device where capturable Adam needs its step counters, and their
    learning rate becomes a tensor that LR schedules fill in place (a float would be baked into the graph, and a
    schedule would recompile it every step); state_dict() and checkpoints keep their form."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32, device=group["params"][0].device)
            for p in group["params"]:
                state = optimizer.state[p]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] = state["step"].to(p.device, torch.float32)
    # the functional Adam never calls optimizer.step(), which an LR scheduler would take for a wrong call order
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before", category=UserWarning)
    cuda_graphs = device.type == "cuda"
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)

    def call(*tensors):
        if cuda_graphs:  # a CUDA graph's outputs live in memory its next replay reuses: mark the step, copy them
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(trace_autograd_ops=True):  # tracing autograd.grad is opt-in (else a break)
            out = compiled(*tensors)
        return torch.utils._pytree.tree_map(torch.clone, out) if cuda_graphs else out
    return call


# SHARED END: compiled_adam


# SHARED BEGIN: diffuser_training
def train_diffuser(config: dict, windows: np.ndarray, val_windows: np.ndarray, writer: SummaryWriter,
                   device: torch.device, known: Optional[torch.Tensor] = None,
                   compile: bool = False) -> tuple[EDMDenoiser, Normalizer, list[dict]]:
    """EDM training with Adam (linear warmup from diffuser_warmup_start x the peak, then cosine decay to 0) as `config`
    (the DIFFUSER_FIELDS of Args) says; `known` ([horizon, channels] bool) marks entries the model is given clean
    (edm_loss). `compile`: the training step (loss, gradients, Adam) compiled into one graph (compile_step; the same
    model within float tolerance). Returns the EMA denoiser, the normaliser and the loss curve (every 500 steps: step,
    train_loss, val_loss, seconds)."""
    normalizer = Normalizer.fit(windows).to(device)
    data = normalizer.normalize(torch.as_tensor(windows, device=device))
    val = normalizer.normalize(torch.as_tensor(val_windows, device=device))[:1024]
    gen = torch.Generator(device=device).manual_seed(config["seed"])
    val_noise = torch.randn(val.shape, generator=gen, device=device)
    val_rnd = torch.randn(val.shape[0], generator=gen, device=device)
    known = None if known is None else torch.as_tensor(known, dtype=torch.bool, device=device)
    denoiser = build_denoiser(config, data.shape[-1]).to(device)
    ema = build_denoiser(config, data.shape[-1]).to(device).requires_grad_(False)
    ema.load_state_dict(denoiser.state_dict())
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config["diffuser_lr"], fused=device.type in ("cpu", "cuda"))
    ema_params, params = list(ema.parameters()), list(denoiser.parameters())
    batch_size, P_mean, P_std = config["diffuser_batch_size"], config["P_mean"], config["P_std"]
    total = config["diffuser_epochs"] * max(1, len(data) // batch_size) or config["diffuser_steps"]
    warmup, start_lr = max(1, round(config["diffuser_warmup"] * total)), config["diffuser_warmup_start"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (
        start_lr + (1 - start_lr) * min(1.0, (s + 1) / warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, total - warmup)))))
    def train_step(x0: torch.Tensor, noise: torch.Tensor, rnd_normal: torch.Tensor) -> torch.Tensor:
        loss = edm_loss(denoiser, x0, P_mean, P_std, noise=noise, rnd_normal=rnd_normal, known=known)
        adam_step(optimizer, loss)
        return loss.detach()

    step_fn = compile_step(train_step, [optimizer], device) if compile else train_step
    print(f"training diffuser: {sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M params, "
          f"{len(data)} windows of {tuple(data.shape[1:])}, {total} steps" + (", compiled" if compile else ""))
    start, curve = time.time(), []
    bar = tqdm(range(total), desc="diffuser", mininterval=5, file=sys.stdout)
    for step in bar:
        x0 = data[torch.randint(len(data), (batch_size,), generator=gen, device=device)]
        loss = step_fn(x0, torch.randn(x0.shape, generator=gen, device=device),
                       torch.randn(batch_size, generator=gen, device=device))
        scheduler.step()
        if (step + 1) % config["ema_every"] == 0:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - config["ema_decay"])
        if step % 500 == 0 or step == total - 1:
            loss = loss.item()
            if not math.isfinite(loss):
                raise SystemExit(f"error: diffusion loss is {loss} at step {step}; lower --diffuser-lr")
            with torch.no_grad():
                val_loss = edm_loss(ema, val, P_mean, P_std, noise=val_noise, rnd_normal=val_rnd, known=known).item()
            writer.add_scalar("diffusion/train_loss", loss, step)
            writer.add_scalar("diffusion/val_loss", val_loss, step)
            writer.add_scalar("diffusion/SPS", (step + 1) / (time.time() - start), step)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}")
            curve.append(dict(step=step, train_loss=loss, val_loss=val_loss, seconds=time.time() - start))
    return ema, normalizer, curve


# SHARED END: diffuser_training


# SHARED BEGIN: sampler
def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} of EDM Eq. 5, and t_N = 0 (float64)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(1, num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def guidance_schedule(num_steps: int, coef: float, cosine: float) -> torch.Tensor:
    """lambda_i = coef * (1 - i/N + c sin(pi (i+1)/N)) for the step i -> i+1; none on the final step (to t_N = 0)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    lam = coef * (1 - i / num_steps + cosine * torch.sin(math.pi * (i + 1) / num_steps))
    lam[-1] = 0.0
    return lam


SAMPLER_FIELDS = ("sampler_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax", "S_noise",
                  "euler_from_churned", "guidance_cosine", "normalize_guidance", "guide_on_denoised", "sampler_bf16",
                  "compile")


class GuidedEDMSampler(nn.Module):
    """EDM stochastic sampler (Algorithm 2: Heun with churn) over normalised windows, with policy guidance on the
    action channels: at the start of each step i (but the last), a <- a + lambda_i * g with g = grad_a log pi(tanh(
    unnorm a) | unnorm s), optionally normalised per trajectory. The guidance (`log_prob_fn(obs, action) -> [B, H]`,
    the target policy's log-likelihood in environment units, and its coefficient) is given at call time; without it
    the sampler is unguided. The constructor's keywords are the Args fields of SAMPLER_FIELDS."""

    def __init__(self, denoiser: EDMDenoiser, normalizer: Normalizer, obs_dim: int, act_dim: int, *,
                 sampler_steps: int, sigma_min: float, sigma_max: float, rho: float, S_churn: float, S_tmin: float,
                 S_tmax: float, S_noise: float, euler_from_churned: bool, guidance_cosine: float,
                 normalize_guidance: bool, guide_on_denoised: bool, sampler_bf16: bool, compile: bool):
        super().__init__()
        self.denoiser, self.normalizer, self.obs_dim, self.act_dim = denoiser, normalizer, obs_dim, act_dim
        self.num_steps, self.S_noise, self.guidance_cosine = sampler_steps, S_noise, guidance_cosine
        self.euler_from_churned, self.normalize_guidance = euler_from_churned, normalize_guidance
        self.guide_on_denoised, self.bf16 = guide_on_denoised, sampler_bf16
        self.t_steps = karras_sigmas(sampler_steps, sigma_min, sigma_max, rho)
        in_churn = (self.t_steps[:-1] >= S_tmin) & (self.t_steps[:-1] <= S_tmax)
        self.gammas = torch.where(in_churn, min(S_churn / sampler_steps, math.sqrt(2) - 1), 0.0)
        self.step_fn = torch.compile(self.step, fullgraph=True, dynamic=False) if compile else self.step

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, known: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x; sigma); with --sampler-bf16 the network F runs in bfloat16 autocast, D's output is float32."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
            return self.denoiser(x, sigma, known)

    def action_score(self, x: torch.Tensor, log_prob_fn: Callable) -> torch.Tensor:
        """grad of sum_t log pi(tanh(unnorm a_t) | unnorm s_t) w.r.t. the normalised action channels [B, H, act_dim]."""
        o, a = slice(0, self.obs_dim), slice(self.obs_dim, self.obs_dim + self.act_dim)
        obs = x[..., o] * self.normalizer.std[o] + self.normalizer.mean[o]

        def log_likelihood(a_norm: torch.Tensor) -> torch.Tensor:
            action = torch.tanh(a_norm * self.normalizer.std[a] + self.normalizer.mean[a])
            return log_prob_fn(obs, action).sum()

        return torch.func.grad(log_likelihood)(x[..., a])

    def guide(self, x: torch.Tensor, t_cur: torch.Tensor, lam: torch.Tensor, log_prob_fn: Callable) -> torch.Tensor:
        """a <- a + lam * g, g evaluated at x (or at D(x; t_cur)) and divided by its norm per trajectory if asked."""
        g = self.action_score(self.denoise(x, t_cur) if self.guide_on_denoised else x, log_prob_fn)
        if self.normalize_guidance:
            g = g / (g.flatten(1).norm(dim=1)[:, None, None] + 1e-8)
        a0, a1 = self.obs_dim, self.obs_dim + self.act_dim
        return torch.cat([x[..., :a0], x[..., a0:a1] + lam * g, x[..., a1:]], -1)

    def step(self, x: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor,
             noise: torch.Tensor, log_prob_fn: Optional[Callable], last: bool, known: Optional[torch.Tensor] = None,
             values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Guidance, then one step of EDM Algorithm 2 (lines 4-11); the last step (to t = 0) has neither guidance
        nor the second-order correction. Inpainting: the `known` entries are reset to `values` after the Euler step
        and after the correction (as DyDiff's sampler), so the correction sees them clean too; a denoiser with
        `clean_known_input` also gets them clean after the churn (unscaled, the churn's noise would reach F)."""
        if log_prob_fn is not None and not last:
            x = self.guide(x, t_cur, lam, log_prob_fn)
        t_hat = t_cur + gamma * t_cur  # line 5: raise the noise level by the churn
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * self.S_noise * noise  # line 6
        if known is not None and self.denoiser.clean_known_input:
            x_hat = torch.where(known, values, x_hat)
        d_cur = (x_hat - self.denoise(x_hat, t_hat, known)) / t_hat  # line 7
        x_next = (x_hat if self.euler_from_churned else x) + (t_next - t_hat) * d_cur  # line 8
        x_next = x_next if known is None else torch.where(known, values, x_next)
        if last:  # line 9: t_next = 0
            return x_next
        d_prime = (x_next - self.denoise(x_next, t_next, known)) / t_next  # line 10
        x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)  # line 11
        return x_next if known is None else torch.where(known, values, x_next)

    @torch.no_grad()
    def forward(self, batch_size: int, horizon: int, generator: torch.Generator, log_prob_fn: Optional[Callable] = None,
                coef: float = 0.0, inpaint: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Sample `batch_size` normalised trajectories [B, horizon, C], guided by `log_prob_fn` with coefficient `coef`
        (unguided when either is None/0); all noise comes from `generator` (CPU). `inpaint` = (known, values): a bool
        mask broadcastable to [B, horizon, C] and normalised values [B, horizon, C]; the known entries equal the values
        from the start and after every step (DyDiff's conditioning on s_0 and the actions)."""
        device = self.normalizer.mean.device
        shape = (batch_size, horizon, self.normalizer.mean.shape[0])
        log_prob_fn = log_prob_fn if coef else None
        lambdas = guidance_schedule(self.num_steps, coef, self.guidance_cosine)
        t, gammas, lambdas = (v.to(device, torch.float32) for v in (self.t_steps, self.gammas, lambdas))
        known, values = (None, None) if inpaint is None else (inpaint[0].to(device), inpaint[1].to(device))
        x = torch.randn(shape, generator=generator).to(device) * t[0]
        x = x if known is None else torch.where(known, values, x)
        for i in range(self.num_steps):
            noise = torch.randn(shape, generator=generator).to(device)
            last = i == self.num_steps - 1  # the cheap last step runs eagerly: one compiled graph per guidance function
            x = (self.step if last else self.step_fn)(x, t[i], t[i + 1], gammas[i], lambdas[i], noise, log_prob_fn, last,
                                                       known, values)
        return x


# SHARED END: sampler


# ALGO LOGIC: the toy environment, its true dynamics and the two scripted policies
def true_dynamics(obs: torch.Tensor, action: torch.Tensor, args: Args) -> torch.Tensor:
    """f(s, a) = clip(s + step_size * (clip(a, -1, 1) + w(s)), -box, box) with the current w(s) = (0, -c sigmoid((x -
    0.1) / 0.1)); any leading shape."""
    push = -args.current * torch.sigmoid((obs[..., :1] - 0.1) / 0.1)
    current = torch.cat([torch.zeros_like(push), push], -1)
    return (obs + args.step_size * (action.clamp(-1, 1) + current)).clamp(-args.box, args.box)


class Toy2DEnv(gym.Env):
    """Point agent in a box: s' = f(s, a); reward -||s' - goal_b|| (the target task); truncated after episode_steps."""

    def __init__(self, args: Args):
        self.args = args
        self.observation_space = gym.spaces.Box(-args.box, args.box, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.goal_b = np.asarray(args.goal_b, dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        noise = self.np_random.normal(0, self.args.start_noise, 2)
        self.state = np.clip(np.asarray(self.args.start) + noise, -self.args.box, self.args.box).astype(np.float32)
        return self.state.copy(), {}

    def step(self, action):
        s = true_dynamics(torch.as_tensor(self.state), torch.as_tensor(action, dtype=torch.float32), self.args)
        self.state, self.t = s.numpy().astype(np.float32), self.t + 1
        reward = -float(np.linalg.norm(self.state - self.goal_b))
        return self.state.copy(), reward, False, self.t >= self.args.episode_steps, {}


def policy_mean(obs: torch.Tensor, goal: tuple[float, float], args: Args) -> torch.Tensor:
    return torch.tanh(args.policy_gain * (torch.as_tensor(goal, dtype=obs.dtype, device=obs.device) - obs))


class TargetPolicy:
    """Gaussian target policy heading to goal B; `log_prob(obs, action)` in env units (used for guidance)."""

    def __init__(self, args: Args):
        self.args = args

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log N(a; tanh(gain (goal_b - s)), std^2 I), summed over the action dims; any leading shape."""
        mean, std = policy_mean(obs, self.args.goal_b, self.args), self.args.target_std
        return (-0.5 * ((action - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, obs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean = policy_mean(obs, self.args.goal_b, self.args)
        noise = torch.randn(mean.shape, generator=generator).to(mean.device)
        return (mean + self.args.target_std * noise).clamp(-ACTION_CLIP, ACTION_CLIP)


def behaviour_action(obs: np.ndarray, offset: np.ndarray, rng: np.random.Generator, args: Args) -> np.ndarray:
    """Scripted noisy behaviour policy heading to goal A + the episode's offset (noise before the tanh, so actions
    stay inside (-1, 1))."""
    goal = np.asarray(args.goal_a) + offset
    pre = args.policy_gain * (goal - obs) + args.behaviour_noise * rng.standard_normal(obs.shape)
    return np.clip(np.tanh(pre), -ACTION_CLIP, ACTION_CLIP).astype(np.float32)


def collect_behaviour_dataset(args: Args, seed: int) -> list[dict]:
    """`num_episodes` behaviour episodes in the episode format of the datasets block (obs [T+1, 2], actions [T, 2],
    rewards/terminals/timeouts [T])."""
    env, rng, episodes = Toy2DEnv(args), np.random.default_rng(seed), []
    for i in range(args.num_episodes):
        obs, _ = env.reset(seed=seed + i)
        e = dict(obs=[obs], actions=[], rewards=[], terminals=[], timeouts=[])
        offset = args.behaviour_goal_std * rng.standard_normal(2)
        while True:
            action = behaviour_action(obs, offset, rng, args)
            obs, reward, terminated, truncated, _ = env.step(action)
            for k, v in zip(("obs", "actions", "rewards", "terminals", "timeouts"),
                            (obs, action, reward, terminated, truncated)):
                e[k].append(v)
            if terminated or truncated:
                break
        episodes.append({k: np.asarray(v, dtype=np.float32) for k, v in e.items()})
    return episodes


@torch.no_grad()
def target_rollouts(args: Args, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` rollouts of the target policy in the real dynamics: obs [num, horizon, 2], actions [num, horizon-1, 2]."""
    policy = TargetPolicy(args)
    start = torch.as_tensor(args.start, dtype=torch.float32)
    obs = [(start + args.start_noise * torch.randn(num, 2, generator=generator)).clamp(-args.box, args.box)]
    actions = []
    for _ in range(args.horizon - 1):
        actions.append(policy.sample(obs[-1], generator))
        obs.append(true_dynamics(obs[-1], actions[-1], args))
    return torch.stack(obs, 1), torch.stack(actions, 1)


# ALGO LOGIC: truncated autoregressive world model (ensemble of MLPs predicting the state change)
class WorldModel(nn.Module):
    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.members = nn.ModuleList(
            nn.Sequential(nn.Linear(4, args.wm_hidden), nn.SiLU(), nn.Linear(args.wm_hidden, args.wm_hidden), nn.SiLU(),
                          nn.Linear(args.wm_hidden, 2)) for _ in range(args.wm_ensemble))

    def predict(self, obs: torch.Tensor, action: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """s' of member[i] for row i: s + step_size * net([s, a])."""
        x = torch.cat([obs, action], -1)
        deltas = torch.stack([m(x) for m in self.members])  # [E, N, 2]
        return obs + self.args.step_size * deltas[member, torch.arange(len(obs))]

    def fit(self, obs: torch.Tensor, actions: torch.Tensor, next_obs: torch.Tensor, generator: torch.Generator,
            writer: SummaryWriter) -> float:
        """MSE on (s' - s) / step_size; each member draws its batches from its own bootstrap of the transitions."""
        target = (next_obs - obs) / self.args.step_size
        x = torch.cat([obs, actions], -1)
        boot = torch.randint(len(x), (len(self.members), len(x)), generator=generator)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.args.wm_lr)
        for step in range(self.args.wm_steps):
            idx = boot.gather(1, torch.randint(len(x), (len(self.members), 256), generator=generator))
            loss = sum(F.mse_loss(m(x[i]), target[i]) for m, i in zip(self.members, idx)) / len(self.members)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 100 == 0 or step == self.args.wm_steps - 1:
                writer.add_scalar("world_model/loss", loss.item(), step)
        return loss.item()

    @torch.no_grad()
    def rollout(self, start_obs: torch.Tensor, length: int, policy: TargetPolicy,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive rollouts of `policy` from `start_obs` [N, 2], a random member per step and row:
        obs [N, length+1, 2], actions [N, length, 2]."""
        obs, actions = [start_obs], []
        for _ in range(length):
            actions.append(policy.sample(obs[-1], generator))
            member = torch.randint(len(self.members), (len(start_obs),), generator=generator)
            obs.append(self.predict(obs[-1], actions[-1], member))
        return torch.stack(obs, 1), torch.stack(actions, 1)


# ALGO LOGIC: metrics of synthetic trajectories against the true dynamics and the target policy
@torch.no_grad()
def one_step_errors(obs: torch.Tensor, actions: torch.Tensor, args: Args) -> torch.Tensor:
    """One-step dynamics error ||s_{t+1} - f(s_t, a_t)|| of each trajectory and step: [N, T]."""
    return (obs[:, 1:] - true_dynamics(obs[:, :-1], actions, args)).norm(dim=-1)


def step_errors(obs: torch.Tensor, actions: torch.Tensor, args: Args) -> torch.Tensor:
    """One-step dynamics error of each step t, averaged over trajectories: [T]."""
    return one_step_errors(obs, actions, args).mean(0)


@torch.no_grad()
def trajectory_metrics(obs: torch.Tensor, actions: torch.Tensor, args: Args) -> dict[str, float]:
    """obs [N, T+1, 2], actions [N, T, 2] (env units) -> mean target log-likelihood of the actions, one-step dynamics
    error (all steps, and the second half of the steps: the long-horizon error), open-loop drift ||s_T - f(...f(s_0,
    a_0)..., a_{T-1})||, end-point distances to the goals and the fraction of end points closer to goal B than to A;
    `se_<metric>` is each one's standard error over the N trajectories."""
    log_prob = TargetPolicy(args).log_prob(obs[:, :-1], actions)
    step_error = one_step_errors(obs, actions, args)  # [N, T]
    replay = obs[:, 0]
    for t in range(actions.shape[1]):
        replay = true_dynamics(replay, actions[:, t], args)
    end = obs[:, -1]
    dist_a = (end - torch.as_tensor(args.goal_a)).norm(dim=-1)
    dist_b = (end - torch.as_tensor(args.goal_b)).norm(dim=-1)
    per_trajectory = dict(target_log_prob=log_prob.mean(1), dynamics_error=step_error.mean(1),
                          late_dynamics_error=step_error[:, step_error.shape[1] // 2:].mean(1),
                          drift=(end - replay).norm(dim=-1), end_dist_a=dist_a, end_dist_b=dist_b,
                          frac_closer_to_b=(dist_b < dist_a).float())
    n = obs.shape[0]
    return dict(**{k: v.mean().item() for k, v in per_trajectory.items()},
                **{f"se_{k}": (v.std().item() / math.sqrt(n) if n > 1 else 0.0) for k, v in per_trajectory.items()},
                steps=actions.shape[1], trajectories=n)


def split_windows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised diffused windows [N, H, 6] -> obs [N, H, 2], actions [N, H-1, 2] (the last row's action has no
    successor state and is dropped)."""
    return x[..., :2], torch.tanh(x[:, :-1, 2:4])


# ALGO LOGIC: figures
GOAL_STYLE = dict(marker="*", s=220, edgecolor="k", linewidth=0.8, zorder=5)


def draw_scene(ax, args: Args, title: str):
    ax.scatter(*args.goal_a, color="tab:orange", label="goal A (behaviour)", **GOAL_STYLE)
    ax.scatter(*args.goal_b, color="tab:green", label="goal B (target)", **GOAL_STYLE)
    ax.scatter(*args.start, color="k", marker="o", s=30, zorder=5)
    ax.set_xlim(-1.1, 1.1), ax.set_ylim(-0.4, 1.2), ax.set_aspect("equal")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def draw_trajectories(ax, obs: torch.Tensor, color: str, n: int):
    for traj in obs[:n].cpu().numpy():
        ax.plot(traj[:, 0], traj[:, 1], color=color, alpha=0.35, lw=0.8)
        ax.scatter(traj[-1, 0], traj[-1, 1], color=color, s=6, zorder=4)


def plot_panel(axes, args: Args, trajs: dict[str, torch.Tensor]):
    """Figure 2: real target rollouts, behaviour data, truncated world model, unguided and policy-guided diffusion."""
    titles = dict(target="target policy (real env)", behaviour="behaviour dataset",
                  world_model=f"truncated world model (k={args.wm_rollout_length})", unguided="unguided diffusion",
                  guided=f"policy-guided diffusion ($\\lambda$={args.guidance_coef:g})")
    colors = dict(target="tab:green", behaviour="tab:orange", world_model="tab:purple", unguided="tab:blue",
                  guided="tab:red")
    for ax, (key, title) in zip(axes, titles.items()):
        draw_scene(ax, args, title)
        draw_trajectories(ax, trajs[key], colors[key], args.plot_trajectories)
    axes[0].legend(loc="lower left", fontsize=6, markerscale=0.5)


def plot_sweep(axes, args: Args, sweep: list[dict], ends: dict[float, torch.Tensor], reference: dict[str, dict],
               curves: dict[str, list[float]]):
    """Figure 3: end points per lambda; target log-likelihood, goal distances and dynamics error against lambda; the
    one-step dynamics error by trajectory step (it rises where a world model's error compounds)."""
    lams = [s["guidance_coef"] for s in sweep]
    cmap = plt.get_cmap("viridis")
    draw_scene(axes[0], args, "where diffused trajectories end")
    handles = []
    for i, lam in enumerate(lams):
        e = ends[lam].cpu().numpy()
        handles.append(axes[0].scatter(e[:, 0], e[:, 1], s=5, alpha=0.6, color=cmap(i / max(1, len(lams) - 1)),
                                       label=f"$\\lambda$={lam:g}"))
    axes[0].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=len(lams), fontsize=7,
                   handletextpad=0.1, columnspacing=0.8, markerscale=2, frameon=False)
    x = np.arange(len(lams))
    axes[1].plot(x, [s["target_log_prob"] for s in sweep], "o-", color="tab:red", label="guided diffusion")
    for key, style in (("target", "tab:green"), ("behaviour", "tab:orange")):
        axes[1].axhline(reference[key]["target_log_prob"], ls="--", color=style, label=f"{key} policy data")
    axes[1].set_title("how on-policy: target log-likelihood", fontsize=9)
    axes[1].set_ylabel("mean log $\\pi_{target}(a|s)$ per step", fontsize=8)
    axes[2].plot(x, [s["end_dist_b"] for s in sweep], "o-", color="tab:green", label="to goal B (target)")
    axes[2].plot(x, [s["end_dist_a"] for s in sweep], "o-", color="tab:orange", label="to goal A (behaviour)")
    axes[2].set_title("where trajectories end", fontsize=9)
    axes[2].set_ylabel("mean end-point distance", fontsize=8)
    axes[3].plot(x, [s["dynamics_error"] for s in sweep], "o-", color="tab:red", label="diffusion, per step")
    axes[3].plot(x, [s["drift"] for s in sweep], "s-", color="tab:red", alpha=0.5, label="diffusion, whole trajectory")
    axes[3].axhline(reference["world_model_full"]["drift"], ls="--", color="tab:purple",
                    label=f"world model, {args.horizon - 1} steps")
    axes[3].axhline(reference["world_model"]["dynamics_error"], ls=":", color="tab:purple", label="world model, per step")
    axes[3].set_yscale("log")
    lowest = min([s["dynamics_error"] for s in sweep] + [reference["world_model"]["dynamics_error"]])
    axes[3].set_ylim(bottom=max(lowest, 1e-12) / 20)  # room for the legend below the lowest line
    axes[3].set_title("how physical: error against the real dynamics", fontsize=9)
    axes[3].set_ylabel("distance to the real next state (log)", fontsize=8)
    for ax in axes[1:4]:
        ax.set_xticks(x, [f"{v:g}" for v in lams])
        ax.set_xlabel("guidance coefficient $\\lambda$", fontsize=8)
    axes[1].legend(fontsize=6, loc="center right")
    axes[2].legend(fontsize=6, loc="upper center")
    axes[3].legend(fontsize=6, loc="lower left")
    for i, (name, curve) in enumerate(curves.items()):  # the world model first, then the lambdas in sweep order
        color = "tab:purple" if i == 0 else cmap((i - 1) / max(1, len(curves) - 2))
        label = name.replace("diffusion, lambda=", "diffusion $\\lambda$=")
        axes[4].plot(np.arange(len(curve)), curve, label=label, color=color, lw=2.5 if i == 0 else 1.5,
                     zorder=3 if i == 0 else 2)
    axes[4].set_yscale("log")
    axes[4].set_title("error against the real dynamics, by step", fontsize=9)
    axes[4].set_xlabel("trajectory step", fontsize=8)
    axes[4].set_ylabel("one-step error (log)", fontsize=8)
    axes[4].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes[1:]:
        ax.tick_params(labelsize=7)


SWEEP_WIDTHS = dict(width_ratios=[1.25, 1, 1, 1, 1])


def save_figures(run_dir: str, args: Args, trajs, sweep, ends, reference, curves) -> list[str]:
    paths = []
    fig, axes = plt.subplots(1, 5, figsize=(15, 3.2))
    plot_panel(axes, args, trajs)
    paths.append(os.path.join(run_dir, "toy2d_panel.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, 5, figsize=(17, 3.6), gridspec_kw=SWEEP_WIDTHS, layout="constrained")
    plot_sweep(axes, args, sweep, ends, reference, curves)
    paths.append(os.path.join(run_dir, "toy2d_sweep.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = plt.figure(figsize=(17, 7.4), layout="constrained")
    sub_top, sub_bottom = fig.subfigures(2, 1)
    plot_panel(sub_top.subplots(1, 5), args, trajs)
    plot_sweep(sub_bottom.subplots(1, 5, gridspec_kw=SWEEP_WIDTHS), args, sweep, ends, reference, curves)
    paths.append(os.path.join(run_dir, "toy2d.png"))
    fig.savefig(paths[-1], dpi=72, bbox_inches="tight")
    plt.close(fig)
    return paths


def metric_table(rows: dict[str, dict]) -> str:
    head = ("| method | target log-lik | dynamics error | 2nd-half error | drift | end dist. to B | end dist. to A | "
            "ends nearer B |")
    lines = [head, "|" + "---|" * 8]
    for name, m in rows.items():
        lines.append(f"| {name} | {m['target_log_prob']:.2f} | {m['dynamics_error']:.4f} | "
                     f"{m['late_dynamics_error']:.4f} | {m['drift']:.3f} | "
                     f"{m['end_dist_b']:.2f} | {m['end_dist_a']:.2f} | {m['frac_closer_to_b']:.2f} |")
    return "\n".join(lines)


# valid range of every numeric field
RANGES = dict(num_threads="[0, inf)", episode_steps="[2, inf)", step_size="(0, inf)", current="(-inf, inf)",
              box="(0, inf)", start="(-inf, inf)", start_noise="[0, inf)", goal_a="(-inf, inf)", goal_b="(-inf, inf)",
              policy_gain="(-inf, inf)", behaviour_noise="[0, inf)", behaviour_goal_std="[0, inf)", target_std="(0, inf)",
              num_episodes="[2, inf)", horizon="[2, inf)", window_stride="[1, inf)", val_fraction="[0, 1)",
              diffuser_channels="[1, inf)", diffuser_mults="[1, inf)", diffuser_kernel_size="[1, inf)",
              diffuser_steps="[1, inf)", diffuser_epochs="[0, inf)", diffuser_batch_size="[1, inf)",
              diffuser_lr="(0, inf)", diffuser_warmup="[0, 1]", diffuser_warmup_start="[0, 1]", ema_decay="[0, 1)",
              ema_every="[1, inf)", sigma_data="(0, inf)", P_mean="(-inf, inf)", P_std="(0, inf)",
              sampler_steps="[1, inf)", sigma_min="(0, inf)", sigma_max="(0, inf)", rho="(0, inf)", S_churn="[0, inf)",
              S_tmin="[0, inf)", S_tmax="[0, inf)", S_noise="(0, inf)", guidance_coef="[0, inf)",
              guidance_sweep="[0, inf)", guidance_cosine="(-inf, inf)", num_samples="[1, inf)",
              reference_samples="[1, inf)", wm_ensemble="[1, inf)", wm_hidden="[1, inf)", wm_steps="[1, inf)", wm_lr="(0, inf)", wm_rollout_length="[1, inf)",
              plot_trajectories="[1, inf)")


def main(args: Args) -> dict:
    start_time = last = time.time()
    phase_times = {}

    def phase(name: str, detail: str = ""):
        """Print a finished phase with its time as the run goes; keep the time for metrics.json."""
        nonlocal last
        phase_times[name], last = time.time() - last, time.time()
        print(f"[toy2d {last - start_time:5.0f}s] {name}: {phase_times[name]:.1f}s" + (f" ({detail})" if detail else ""),
              flush=True)
    if args.quick:
        defaults = Args()
        for k, v in QUICK.items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
    check_ranges(args, RANGES)
    if args.horizon > args.episode_steps:
        raise SystemExit(f"error: --horizon {args.horizon} must be at most --episode-steps {args.episode_steps}")
    if not args.guidance_sweep:
        raise SystemExit("error: --guidance-sweep must not be empty")
    run_dir = os.path.join(args.runs_root, f"toy2d__{args.exp_name}__{args.seed}__{int(time.time())}")
    try:
        os.makedirs(run_dir, exist_ok=False)
    except OSError as e:
        raise SystemExit(f"error: cannot create run dir {run_dir} ({e.strerror}); pass a writable --runs-root") from None
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)

    # data: behaviour episodes, windows for the diffuser (validation split by episodes)
    episodes = collect_behaviour_dataset(args, args.seed)
    rng = np.random.default_rng(args.seed)
    val_mask = rng.random(len(episodes)) < args.val_fraction
    if not val_mask.any() or val_mask.all():
        val_mask[:] = False
        val_mask[0] = len(episodes) > 1
    train_eps = [e for e, v in zip(episodes, val_mask) if not v]
    windows = make_windows(train_eps, args.horizon, args.window_stride)
    val_windows = make_windows([e for e, v in zip(episodes, val_mask) if v], args.horizon, args.window_stride) \
        if val_mask.any() else windows
    real = {k: torch.as_tensor(v) for k, v in transitions_from_episodes(train_eps).items()}
    print(f"toy2d: {len(episodes)} behaviour episodes, {len(real['obs'])} transitions, {len(windows)} windows of "
          f"{args.horizon} steps")

    # ALGO LOGIC: world model, diffuser, samples
    gen = torch.Generator().manual_seed(args.seed)
    policy = TargetPolicy(args)
    phase("data")
    world_model = WorldModel(args)
    wm_loss = world_model.fit(real["obs"], real["actions"], real["next_obs"], gen, writer)
    phase("world model", f"{args.wm_ensemble} members, final loss {wm_loss:.2e}")
    config = {k: getattr(args, k) for k in DIFFUSER_FIELDS}
    denoiser, normalizer, _ = train_diffuser(config, windows, val_windows, writer, device, compile=args.compile)
    atomic_torch_save(dict(ema=denoiser.state_dict(), mean=normalizer.mean, std=normalizer.std, config=config,
                           data_dim=windows.shape[-1], dataset_id="toy2d"), os.path.join(run_dir, "diffuser.pt"))
    denoiser.requires_grad_(False)
    phase("diffuser training", f"{config['diffuser_steps']} steps")

    trajs, rows, ends, sweep = {}, {}, {}, []
    n = args.reference_samples
    trajs["target"], actions = target_rollouts(args, n, gen)
    rows["target policy (real env)"] = reference_target = trajectory_metrics(trajs["target"], actions, args)
    ep_idx = torch.randperm(len(train_eps), generator=gen)[:n]
    obs = torch.stack([torch.as_tensor(train_eps[i]["obs"][:args.horizon]) for i in ep_idx])
    actions = torch.stack([torch.as_tensor(train_eps[i]["actions"][:args.horizon - 1]) for i in ep_idx])
    trajs["behaviour"] = obs
    rows["behaviour dataset"] = reference_behaviour = trajectory_metrics(obs, actions, args)
    starts = real["obs"][torch.randint(len(real["obs"]), (n,), generator=gen)]
    trajs["world_model"], actions = world_model.rollout(starts, args.wm_rollout_length, policy, gen)
    rows[f"world model, k={args.wm_rollout_length} from data"] = wm = trajectory_metrics(trajs["world_model"], actions, args)
    obs, actions = world_model.rollout(trajs["target"][:, 0], args.horizon - 1, policy, gen)
    rows[f"world model, {args.horizon - 1} steps from start"] = wm_full = trajectory_metrics(obs, actions, args)
    curves = {"world model": step_errors(obs, actions, args).tolist()}  # one-step error by trajectory step
    phase("reference rollouts", "target policy, behaviour data, world model")

    n = args.num_samples
    lams = sorted(set(args.guidance_sweep) | {0.0, args.guidance_coef})
    sampler = GuidedEDMSampler(denoiser, normalizer, 2, 2, **{k: getattr(args, k) for k in SAMPLER_FIELDS})
    for lam in lams:
        sample_gen = torch.Generator().manual_seed(args.seed + 1)  # the same noise for every lambda
        x = normalizer.unnormalize(sampler(n, args.horizon, sample_gen, policy.log_prob, lam))
        if not torch.isfinite(x).all():
            raise SystemExit(f"error: the sampler produced NaN/inf at guidance coefficient {lam}")
        obs, actions = split_windows(x)
        m = trajectory_metrics(obs, actions, args)
        ends[lam] = obs[:, -1]
        if lam == 0:
            trajs["unguided"] = obs
        if lam == args.guidance_coef:
            trajs["guided"] = obs
        if lam in args.guidance_sweep:
            sweep.append(dict(guidance_coef=lam, **m))
            curves[f"diffusion, lambda={lam:g}"] = step_errors(obs, actions, args).tolist()
        rows["unguided diffusion" if lam == 0 else f"policy-guided diffusion, lambda={lam:g}"] = m
        for k, v in m.items():
            writer.add_scalar(f"sweep/{k}", v, int(round(lam * 1000)))
        print(f"lambda {lam:g}: target log-lik {m['target_log_prob']:.2f}, dynamics error {m['dynamics_error']:.4f}, "
              f"end dist B {m['end_dist_b']:.2f} / A {m['end_dist_a']:.2f}", flush=True)
    phase("sampling", f"{len(lams)} guidance coefficients x {n} trajectories, {args.sampler_steps} steps")

    # TRY NOT TO MODIFY: figures, metrics table and JSON
    reference = dict(target=reference_target, behaviour=reference_behaviour, world_model=wm, world_model_full=wm_full)
    figures = save_figures(run_dir, args, trajs, sweep, {s["guidance_coef"]: ends[s["guidance_coef"]] for s in sweep},
                           reference, curves)
    if args.docs_figure:
        os.makedirs(os.path.dirname(args.docs_figure) or ".", exist_ok=True)
        shutil.copyfile(figures[-1], args.docs_figure)
    table = metric_table(rows)
    phase("metrics and figures")
    wall = time.time() - start_time
    summary = dict(methods=rows, sweep=sweep, step_errors=curves, figures=figures, run_dir=run_dir, wall_time_s=wall,
                   phase_times_s=phase_times, diffuser_train_time_s=phase_times["diffuser training"],
                   sample_time_s=phase_times["sampling"], threads=torch.get_num_threads(),
                   args=dataclasses.asdict(args))
    with open(os.path.join(run_dir, "metrics.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(run_dir, "metrics.json.tmp"), os.path.join(run_dir, "metrics.json"))
    writer.close()
    print(table)
    print(f"toy2d: {wall:.0f}s wall time on {torch.get_num_threads()} threads ("
          + ", ".join(f"{k} {v:.0f}s" for k, v in phase_times.items()) + ")")
    print(f"figure: {figures[-1]}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
