"""PETS-style world-model baseline and the PGD paper's diagnostics (Jackson et al., 2024, Figures 5 and 6), in one file.

1. Train a probabilistic ensemble dynamics model (PETS, Chua et al., 2018): `--ensemble-size` MLPs with Gaussian
   outputs over [delta obs, reward], learned soft bounds on the log-variance, early stopping on held-out episodes;
   the `--num-elites` best members on the held-out set are the elites.
2. Truncated model rollouts of `--rollout-length` steps from dataset states under each target policy (a random elite
   per transition, next state sampled from its Gaussian).
3. PGD trajectories from a trained diffuser (`--diffuser-checkpoint`, as cached by pgd_iql.py / pgd_td3bc.py) with the
   shared guided EDM sampler at each coefficient of `--guidance-coefs`, guided by the same target policy (0: unguided).
   With `--dydiff-checkpoint` (a state model of dydiff_td3bc.py), DyDiff rollouts from the same start states (first
   trajectory from the ensemble of step 1, `--dydiff-iterations` policy injections) are measured too.
4. Diagnostics per method and per rollout step: dynamics error against the real MuJoCo simulator (the simulator is
   set to each synthetic state, stepped with the synthetic action, and its next observation compared with the
   synthetic one) and the mean log-likelihood of the synthetic actions under the target policy. Real dataset windows
   are measured too, as a reference (their dynamics error is ~0 by construction).
Writes `results.json`, `table.csv`, `figure5_action_likelihood.png`, `figure6_dynamics_error.png` to the run dir.

Usage:
    python pets_baseline.py --env-id halfcheetah-medium --diffuser-checkpoint checkpoints/diffusers/<file>.pt \
        --policy-checkpoints runs/<iql run>/policy.pt policies/halfcheetah-expert.pt
Target policies: `policy.pt` of pgd_iql.py / pgd_td3bc.py (`--save-model`) or a SAC behaviour policy of
collect_datasets.py (`--policy-dir`); see `load_policy`.
Blocks between `# SHARED BEGIN: x` and `# SHARED END: x` are copied word for word from pgd_iql.py
(`python tools/sync_shared.py pgd_iql.py`).
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
import csv


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (numpy, torch, ensemble init and batches, rollouts, sampler noise)"""
    env_id: str = "halfcheetah-medium"
    """dataset the dynamics model is trained on: a short name (e.g. `halfcheetah-medium`) or a Minari id"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    torch_threads: Optional[int] = None
    """torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)"""
    runs_root: str = "runs"
    """folder for the run directories `{runs_root}/{env}__{exp}__{seed}__{time}`"""
    track: bool = False
    """if toggled, log to Weights and Biases (imported only then)"""
    wandb_project_name: str = "pgd"
    """the wandb project name"""

    # Target policies and diffuser
    policy_checkpoints: tuple[str, ...] = ()
    """target policies (one or more): `policy.pt` of pgd_iql.py / pgd_td3bc.py, or a SAC policy of collect_datasets.py"""
    policy_names: tuple[str, ...] = ()
    """labels of the target policies in the table and plots (default: derived from the paths)"""
    diffuser_checkpoint: Optional[str] = None
    """diffuser checkpoint (pgd_iql.py's cache, checkpoints/diffusers/*.pt); without it only PETS and the data are measured"""
    guidance_coefs: tuple[float, ...] = (0.0, 0.03, 0.1, 0.3, 1.0)
    """PGD guidance coefficients to sweep (0: unguided diffusion)"""

    # Guided EDM sampler (same meaning and defaults as in pgd_iql.py)
    sampler_steps: int = 64
    """Heun steps of the EDM sampler"""
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
    guidance_cosine: float = 0.3
    """c in lambda_i = coef * (1 - i/N + c * sin(pi (i+1) / N))"""
    normalize_guidance: bool = True
    """divide the guidance gradient by its norm per trajectory, g / (||g|| + 1e-8), so coef is a step length (official: off)"""
    guide_on_denoised: bool = False
    """evaluate the policy gradient at the denoised estimate D(x; sigma) (one more network call) instead of the noisy sample"""
    dydiff_checkpoint: Optional[str] = None
    """a DyDiff state model (`state_model.pt` of dydiff_td3bc.py --save-model): its rollouts from the same start
    states, first trajectory from this run's ensemble, are measured too"""
    dydiff_iterations: int = 2
    """DyDiff's policy-injection iterations M for those rollouts"""
    dydiff_sampler_steps: int = 34
    """Heun steps of DyDiff's sampler (its other settings are DYDIFF_SAMPLER's)"""
    sample_horizon: Optional[int] = None
    """rows of the sampled PGD trajectories (default: the diffuser's training horizon; e.g. 129 as the paper samples)"""
    sample_batch_size: int = 256
    """trajectories sampled per batch"""
    sampler_bf16: bool = False
    """run the denoiser's network F in bfloat16 autocast while sampling (the EDM skip path and guidance stay float32)"""
    compile: bool = torch.cuda.is_available()
    """torch.compile the sampler step (default: on with CUDA)"""

    # PETS dynamics ensemble
    ensemble_size: int = 7
    """members of the probabilistic ensemble"""
    num_elites: int = 5
    """members with the lowest held-out error used for rollouts"""
    dynamics_hidden: int = 200
    """hidden width of each member"""
    dynamics_layers: int = 4
    """hidden layers of each member (SiLU)"""
    dynamics_lr: float = 1e-3
    """Adam learning rate"""
    dynamics_weight_decay: float = 5e-5
    """L2 weight decay (Adam)"""
    dynamics_batch_size: int = 256
    """batch size per member (each member draws its own batch)"""
    dynamics_steps: int = 20_000
    """maximum gradient steps"""
    dynamics_eval_every: int = 500
    """held-out evaluation (and early-stopping check) every this many steps"""
    dynamics_patience: int = 5
    """stop after this many evaluations in which no member improved its held-out MSE by more than 1%"""
    dynamics_val_fraction: float = 0.1
    """fraction of episodes held out for early stopping and elite selection"""
    dynamics_max_holdout: int = 10_000
    """held-out transitions used per evaluation (a fixed random subset)"""
    logvar_loss_coef: float = 0.01
    """weight of (max_logvar - min_logvar) in the loss, tightening the learned log-variance bounds"""
    dynamics_checkpoint: Optional[str] = None
    """load a trained ensemble (`dynamics.pt` of an earlier run of this script on the same dataset) instead of training"""

    # Rollouts and diagnostics
    num_trajectories: int = 256
    """trajectories per method (PETS rollouts, PGD samples, dataset windows)"""
    rollout_length: Optional[int] = None
    """transitions per trajectory (default and maximum with a diffuser: the sampled length - 1; else 31)"""
    deterministic_rollouts: bool = False
    """if toggled, PETS rollouts take the target policy's mean action instead of a sample"""
    report_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 31)
    """rollout steps reported in the table (steps past the rollout length are dropped; the last step is added)"""
    clip_tolerance: float = 1e-3
    """Hopper/Walker2d: states with an observed |velocity| >= 10 - tol are flagged (true velocity unknown) and skipped"""


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


# SHARED BEGIN: dataset_ids
# Dataset names -> Minari dataset ids. Three sources, never shadowing each other:
#  - built here by collect_datasets.py (SAC behaviour policies, waypoint maze controller): `hopper-medium-replay`,
#    `maze2d-umaze`, ...; `mujoco/<env>/{medium,expert}-v0` and `D4RL/pointmaze/*` also exist on Minari's remote store;
#  - D4RL's own files, imported by `collect_datasets.py --env-id hopper-medium-replay-v2` (from ~/.d4rl/datasets,
#    --d4rl-file or --download): D4RL's names, under a `D4RL/<env>/` namespace of their own.
D4RL_DATASETS = {
    **{f"{env}-{level}-v2": f"D4RL/{env}/{level}-v2" for env in ("halfcheetah", "hopper", "walker2d")
       for level in ("random", "medium", "medium-replay", "medium-expert", "expert")},
    **{f"maze2d-{maze}-v1": f"D4RL/maze2d/{maze}-v1" for maze in ("umaze", "medium", "large")},
}
DATASETS = {
    **{f"{env}-{level}": f"mujoco/{env}/{level}-v0" for env in ("halfcheetah", "hopper", "walker2d")
       for level in ("random", "medium", "medium-replay", "expert", "medium-expert")},
    **{f"maze2d-{maze}": f"D4RL/pointmaze/{maze}-v2" for maze in ("umaze", "medium", "large")},
    **D4RL_DATASETS,
}


def minari_store() -> str:
    """The local Minari store (`$MINARI_DATASETS_PATH`, else ~/.minari/datasets); one line when it cannot be made."""
    from minari.storage.datasets_root_dir import get_dataset_path
    try:
        return str(get_dataset_path())
    except OSError as e:
        raise SystemExit(f"error: the Minari store {os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')} "
                         f"cannot be created ({e.strerror}); set MINARI_DATASETS_PATH to a writable folder") from None


def unreadable(dataset_id: str, e: BaseException) -> SystemExit:
    """The one-line error for a local dataset whose files cannot be read (truncated, garbled, parts missing)."""
    name = {v: k for k, v in DATASETS.items()}.get(dataset_id, dataset_id)
    reason = (str(e).strip().splitlines() or [""])[0][:160]
    return SystemExit(f"error: Minari dataset {dataset_id!r} in {os.path.join(minari_store(), dataset_id)} is "
                      f"unreadable ({type(e).__name__}: {reason}); delete that folder and rebuild it with: "
                      f"python collect_datasets.py --env-id {name}")


def load_dataset(env_id: str):
    """The Minari dataset behind a name (`hopper-medium-replay`, `hopper-medium-replay-v2`) or a full Minari id:
    local store first, then Minari's remote store (not for D4RL imports); one line naming the command that makes it."""
    import minari
    if env_id not in DATASETS and "/" not in env_id:
        raise SystemExit(f"error: unknown --env-id {env_id!r}; use one of {', '.join(DATASETS)} or a Minari id")
    dataset_id = DATASETS.get(env_id, env_id)
    store = minari_store()
    if dataset_id in minari.list_local_datasets():
        try:
            return minari.load_dataset(dataset_id)
        except Exception as e:  # metadata present but unreadable
            raise unreadable(dataset_id, e) from None
    if os.path.isdir(os.path.join(store, dataset_id, "data")):  # a folder Minari does not list: data or metadata gone
        raise unreadable(dataset_id, FileNotFoundError("no readable data/metadata.json or data file"))
    name = {v: k for k, v in DATASETS.items()}.get(dataset_id, env_id)
    if dataset_id in D4RL_DATASETS.values():
        raise SystemExit(f"error: D4RL dataset {name!r} is not imported yet; import it with: python collect_datasets.py "
                         f"--env-id {name} (reads D4RL's hdf5 file from $D4RL_DATASET_DIR or ~/.d4rl/datasets; "
                         f"or add --d4rl-file PATH, or --download)")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ImportError as e:  # minari's remote store needs huggingface_hub (the `minari[hf]` extra)
        raise SystemExit(f"error: Minari dataset {dataset_id!r} is not in the local store, and downloading it needs a "
                         f"missing package ({e}); pip install -r requirements.txt, or build it here with: "
                         f"python collect_datasets.py --env-id {name}") from None
    except Exception as e:  # network down, or Minari has no such remote dataset
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise SystemExit(f"error: Minari dataset {dataset_id!r} is not in the local store and could not be downloaded "
                         f"({type(e).__name__}: {reason}); build it here with: python collect_datasets.py "
                         f"--env-id {name}") from None


# SHARED END: dataset_ids


# SHARED BEGIN: minari_episodes
def flatten_obs(obs, space: gym.Space) -> np.ndarray:
    """Dict observations (PointMaze) -> one flat array, keys in the space's order; Box observations as they are."""
    if isinstance(space, gym.spaces.Dict):
        return np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(len(obs[k]), -1) for k in space.spaces], -1)
    return np.asarray(obs, dtype=np.float32)


def episodes_from_minari(dataset) -> list[dict]:
    """Each episode as float32 arrays: obs [T+1, obs_dim], actions [T, act_dim], rewards/terminals/timeouts [T]."""
    episodes = []
    try:
        raw = list(dataset.iterate_episodes())
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py: truncated or garbled file
        raise unreadable(dataset.spec.dataset_id, e) from None
    for ep in raw:
        e = dict(obs=flatten_obs(ep.observations, dataset.observation_space),
                 actions=np.asarray(ep.actions, dtype=np.float32).reshape(len(ep.actions), -1),
                 rewards=np.asarray(ep.rewards, dtype=np.float32),
                 terminals=np.asarray(ep.terminations, dtype=np.float32),
                 timeouts=np.asarray(ep.truncations, dtype=np.float32))
        if not all(np.isfinite(v).all() for v in e.values()):
            raise SystemExit(f"error: episode {ep.id} of {dataset.spec.dataset_id} has NaN/inf values; rebuild the dataset")
        episodes.append(e)
    if not episodes:
        raise SystemExit(f"error: dataset {dataset.spec.dataset_id} has no episodes")
    return episodes


# SHARED END: minari_episodes


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


# SHARED BEGIN: diffuser_loading
def load_diffuser(path: str, device: torch.device) -> tuple[EDMDenoiser, Normalizer, dict]:
    """A checkpoint as written by get_diffuser: dict(ema, mean, std, config, data_dim, dataset_id)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --diffuser-checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        denoiser = build_denoiser(ckpt["config"], ckpt["data_dim"]).to(device)
        denoiser.load_state_dict(ckpt["ema"])
    except Exception as e:  # garbage, truncated, or another script's checkpoint
        raise SystemExit(f"error: {path} is not a readable diffuser checkpoint of this harness ({type(e).__name__}); "
                         f"delete it and train again, or pass another --diffuser-checkpoint") from None
    return denoiser.requires_grad_(False), Normalizer(ckpt["mean"], ckpt["std"]).to(device), ckpt


# SHARED END: diffuser_loading


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


# ALGO LOGIC: target policies
def load_policy(path: str, device: torch.device = torch.device("cpu"), obs_dim: Optional[int] = None,
                act_dim: Optional[int] = None):
    """A target-policy checkpoint -> (act_fn(obs, deterministic=False) -> action, log_prob_fn(obs, action) -> log pi).

    Both take env units and any leading shape; actions lie in [-1, 1]; log_prob_fn is differentiable (guidance).
      iql_gaussian (pgd_iql.py): N(tanh(actor(norm obs)), exp(log_std)); log pi summed over action dims
      td3bc_deterministic (pgd_td3bc.py): tanh(actor(norm obs)); log pi = unit Gaussian centred on that action
      sac_tanh_gaussian (collect_datasets.py): tanh(N(mean, std)) of raw obs, with the tanh change of variables
    Sampled actions and the actions given to log_prob_fn are clipped to +-ACTION_CLIP, the diffuser's convention."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: policy checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable policy checkpoint ({type(e).__name__}); pass a policy.pt "
                         f"written with --save-model or a collect_datasets.py policy") from None
    kind = ckpt.get("kind") if isinstance(ckpt, dict) else None
    if kind not in ("iql_gaussian", "td3bc_deterministic", "sac_tanh_gaussian"):
        raise SystemExit(f"error: {path} is not a policy checkpoint (kind {kind!r}); pass a policy.pt written with "
                         f"--save-model or a collect_datasets.py policy")
    o, a, (h1, h2) = ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden"]
    if (obs_dim is not None and o != obs_dim) or (act_dim is not None and a != act_dim):
        raise SystemExit(f"error: policy {path} maps {o} obs dims to {a} actions; the dataset has {obs_dim} and {act_dim}")

    if kind == "sac_tanh_gaussian":
        net = nn.ModuleDict(dict(trunk=nn.Sequential(nn.Linear(o, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU()),
                                 mean=nn.Linear(h2, a), log_std=nn.Linear(h2, a)))
        net.load_state_dict(ckpt["state_dict"])
        net = net.to(device).requires_grad_(False)

        def heads(obs):
            h = net["trunk"](obs)
            return net["mean"](h), net["log_std"](h).clamp(-5, 2)

        def act_fn(obs, deterministic=False):
            mean, log_std = heads(obs)
            u = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
            return torch.tanh(u).clamp(-ACTION_CLIP, ACTION_CLIP)

        def log_prob_fn(obs, action):
            mean, log_std = heads(obs)
            u = torch.atanh(action.clamp(-ACTION_CLIP, ACTION_CLIP))
            log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))  # log(1 - tanh(u)^2), stable
            return (torch.distributions.Normal(mean, log_std.exp()).log_prob(u) - log_det).sum(-1)

        return act_fn, log_prob_fn

    actor = nn.Sequential(nn.Linear(o, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, a))
    actor.load_state_dict(ckpt["state_dict"])
    actor = actor.to(device).requires_grad_(False)
    obs_mean, obs_std = (torch.as_tensor(ckpt[k], dtype=torch.float32, device=device) for k in ("obs_mean", "obs_std"))
    std = (ckpt["log_std"].to(device).clamp(ckpt.get("log_std_min", -5.0), 2).exp() if kind == "iql_gaussian"
           else torch.ones(a, device=device))

    def mean_fn(obs):
        return torch.tanh(actor((obs - obs_mean) / obs_std))

    def act_fn(obs, deterministic=False):
        mean = mean_fn(obs)
        if deterministic or kind == "td3bc_deterministic":
            return mean
        return (mean + std * torch.randn_like(mean)).clamp(-ACTION_CLIP, ACTION_CLIP)

    def log_prob_fn(obs, action):
        return torch.distributions.Normal(mean_fn(obs), std).log_prob(action).sum(-1)

    return act_fn, log_prob_fn


# SHARED BEGIN: ensemble
# ALGO LOGIC: PETS probabilistic ensemble (Chua et al., 2018); DyDiff's one-step model for its first trajectory
class EnsembleLinear(nn.Module):
    """`members` independent linear layers applied as one batched matmul: [E, B, in] -> [E, B, out]."""

    def __init__(self, members: int, in_dim: int, out_dim: int):
        super().__init__()
        bound = 1 / math.sqrt(in_dim)
        self.weight = nn.Parameter(torch.empty(members, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, out_dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class ProbabilisticEnsemble(nn.Module):
    """E MLPs (obs, action) -> Gaussian over the normalised target [obs' - obs, reward]; inputs and targets are
    z-scored with buffers set from the training data. The log-variance is soft-clamped between learned per-member
    bounds: logvar = max - softplus(max - logvar); logvar = min + softplus(logvar - min). Every parameter has the
    member as its leading dimension (early stopping keeps each member's best weights)."""

    def __init__(self, obs_dim: int, act_dim: int, members: int, hidden: int, layers: int, num_elites: int):
        super().__init__()
        self.obs_dim, self.members = obs_dim, members
        in_dim, out_dim = obs_dim + act_dim, obs_dim + 1
        dims, mods = [in_dim] + [hidden] * layers, []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            mods += [EnsembleLinear(members, d_in, d_out), nn.SiLU()]
        self.net = nn.Sequential(*mods, EnsembleLinear(members, dims[-1], 2 * out_dim))
        self.max_logvar = nn.Parameter(torch.full((members, 1, out_dim), 0.5))
        self.min_logvar = nn.Parameter(torch.full((members, 1, out_dim), -10.0))
        for name, dim in (("in_mean", in_dim), ("in_std", in_dim), ("out_mean", out_dim), ("out_std", out_dim)):
            self.register_buffer(name, torch.zeros(dim) if name.endswith("mean") else torch.ones(dim))
        self.register_buffer("elites", torch.arange(num_elites))

    def set_normalization(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.in_mean.copy_(inputs.mean(0)), self.in_std.copy_(inputs.std(0).clamp(min=1e-4))
        self.out_mean.copy_(targets.mean(0)), self.out_std.copy_(targets.std(0).clamp(min=1e-4))

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw inputs [B, in] (every member sees them) or [E, B, in] -> normalised (mean, logvar) [E, B, out]."""
        x = (inputs - self.in_mean) / self.in_std
        if x.dim() == 2:
            x = x.expand(self.members, *x.shape)
        mean, logvar = self.net(x).chunk(2, -1)
        logvar = self.max_logvar - F.softplus(self.max_logvar - logvar)
        return mean, self.min_logvar + F.softplus(logvar - self.min_logvar)

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, logvar_coef: float) -> torch.Tensor:
        """Gaussian NLL (up to constants) summed over members, plus the bound-tightening term."""
        mean, logvar = self(inputs)
        t = (targets - self.out_mean) / self.out_std
        nll = ((mean - t) ** 2 * torch.exp(-logvar) + logvar).mean((1, 2)).sum()
        return nll + logvar_coef * (self.max_logvar.sum() - self.min_logvar.sum())

    @torch.no_grad()
    def mse(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-member MSE of the predicted means, in normalised target units [E]."""
        mean, _ = self(inputs)
        return ((mean - (targets - self.out_mean) / self.out_std) ** 2).mean((1, 2))

    @torch.no_grad()
    def step(self, obs: torch.Tensor, action: torch.Tensor, generator: torch.Generator, deterministic: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(next obs, reward) [B, obs_dim], [B] from a random elite per row: a draw from its Gaussian, or its mean
        (`deterministic`, as DyDiff's first trajectory)."""
        mean, logvar = self(torch.cat([obs, action], -1))
        rows = torch.arange(len(obs), device=obs.device)
        member = self.elites[torch.randint(len(self.elites), (len(obs),), generator=generator).to(obs.device)]
        mean, std = mean[member, rows], (0.5 * logvar[member, rows]).exp()
        noise = torch.randn(mean.shape, generator=generator).to(obs.device)
        out = (mean + (0 if deterministic else std * noise)) * self.out_std + self.out_mean
        return obs + out[:, :self.obs_dim], out[:, self.obs_dim]

    @torch.no_grad()
    def reward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """r(s, a) [any leading shape]: the elites' mean predicted reward (DyDiff's reward model)."""
        lead = obs.shape[:-1]
        mean, _ = self(torch.cat([obs, action], -1).reshape(-1, obs.shape[-1] + action.shape[-1]))
        r = mean[self.elites, :, self.obs_dim].mean(0) * self.out_std[self.obs_dim] + self.out_mean[self.obs_dim]
        return r.reshape(lead)


def train_ensemble(args: Args, episodes: list[dict], writer: SummaryWriter, device: torch.device,
                   ) -> tuple[ProbabilisticEnsemble, dict]:
    """Train on the episodes not held out; every `dynamics_eval_every` steps each member's held-out MSE is measured and
    its weights kept when it improved by > 1%; stop after `dynamics_patience` evaluations without any improvement.
    The `num_elites` members of lowest held-out MSE become the elites."""
    rng = np.random.default_rng(args.seed)
    held = rng.random(len(episodes)) < args.dynamics_val_fraction
    if len(episodes) > 1 and (held.all() or not held.any()):
        held[:] = False
        held[rng.integers(len(episodes))] = True

    def tensors(eps):
        tr = transitions_from_episodes(eps)
        x = torch.as_tensor(np.concatenate([tr["obs"], tr["actions"]], 1), device=device)
        y = torch.as_tensor(np.concatenate([tr["next_obs"] - tr["obs"], tr["rewards"][:, None]], 1), device=device)
        return x, y

    x, y = tensors([e for e, h in zip(episodes, held) if not h] or episodes)
    vx, vy = tensors([e for e, h in zip(episodes, held) if h] or episodes)
    keep = torch.as_tensor(rng.permutation(len(vx))[:args.dynamics_max_holdout], device=device)
    vx, vy = vx[keep], vy[keep]
    obs_dim = episodes[0]["obs"].shape[1]
    model = ProbabilisticEnsemble(obs_dim, x.shape[1] - obs_dim, args.ensemble_size, args.dynamics_hidden,
                                  args.dynamics_layers, args.num_elites).to(device)
    model.set_normalization(x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.dynamics_lr, weight_decay=args.dynamics_weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    best = torch.full((args.ensemble_size,), math.inf, device=device)
    best_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    since, start = 0, time.time()
    print(f"training dynamics ensemble: {args.ensemble_size} x {sum(p.numel() for p in model.parameters()) // args.ensemble_size} "
          f"params, {len(x)} train / {len(vx)} held-out transitions, at most {args.dynamics_steps} steps")
    bar = tqdm(range(1, args.dynamics_steps + 1), desc="dynamics", mininterval=5, file=sys.stdout)
    for step in bar:
        idx = torch.randint(len(x), (args.ensemble_size, args.dynamics_batch_size), generator=gen).to(device)
        loss = model.loss(x[idx], y[idx], args.logvar_loss_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % args.dynamics_eval_every == 0 or step == args.dynamics_steps:
            mse = model.mse(vx, vy)
            improved = mse < 0.99 * best
            for n, p in model.named_parameters():
                best_params[n][improved] = p.detach()[improved]
            best = torch.where(improved, mse, best)
            since = 0 if improved.any() else since + 1
            writer.add_scalar("dynamics/train_loss", loss.item(), step)
            writer.add_scalar("dynamics/holdout_mse", mse.mean().item(), step)
            bar.set_postfix(loss=f"{loss.item():.3f}", holdout=f"{mse.min().item():.4f}")
            if not math.isfinite(loss.item()):
                raise SystemExit(f"error: dynamics loss is {loss.item()} at step {step}; lower --dynamics-lr")
            if since >= args.dynamics_patience:
                break
    bar.close()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(best_params[n])
    model.elites.copy_(torch.argsort(best)[:args.num_elites])
    info = dict(steps=step, holdout_mse=best.tolist(), elites=model.elites.tolist(), train_time_s=time.time() - start,
                train_transitions=len(x), holdout_transitions=len(vx))
    print(f"dynamics: stopped at step {step}, held-out MSE (normalised) of the elites "
          f"{best[model.elites].mean().item():.4f}, {info['train_time_s']:.0f}s")
    return model, info


# SHARED END: ensemble


# SHARED BEGIN: dydiff
# ALGO LOGIC: DyDiff's generator (Zhao et al., 2024; FineArtz/DyDiff generate_rl.py), on the shared EDM sampler
DYDIFF_SAMPLER = dict(sampler_steps=34, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=60.0, S_tmin=0.37,
                      S_tmax=52.24, S_noise=1.002, euler_from_churned=True, guidance_cosine=0.0,
                      normalize_guidance=False, guide_on_denoised=False, sampler_bf16=False, compile=False)


def state_model_known(horizon: int, obs_dim: int, act_dim: int) -> torch.Tensor:
    """[horizon, obs_dim + act_dim] bool: what the action-conditioned state model is given clean: s_0 and every action."""
    known = torch.zeros(horizon, obs_dim + act_dim, dtype=torch.bool)
    known[0, :obs_dim] = True
    known[:, obs_dim:] = True
    return known


@torch.no_grad()
def dydiff_rollouts(sampler: GuidedEDMSampler, ensemble: "ProbabilisticEnsemble", act_fn: Callable,
                    start_obs: torch.Tensor, horizon: int, iterations: int, generator: torch.Generator,
                    ) -> dict[str, torch.Tensor]:
    """Rollouts of `horizon` rows (states s_0..s_{H-1}, actions a_0..a_{H-1}) from `start_obs` [B, obs_dim]:
    1. the first trajectory: a_t = act_fn(s_t) (deterministic), s_{t+1} = the mean of a random elite of the ensemble;
    2. `iterations` times: a full sampling pass of the state model (`sampler` over [obs, arctanh(action)] channels,
       fresh noise) with s_0 and every action clamped; the states become the average of the sampled and the previous
       ones; the actions are relabelled a_t = act_fn(s_t).
    Returns dict(obs [B, H, obs_dim], actions [B, H, act_dim]) in env units, actions clipped to +-ACTION_CLIP."""
    act = lambda s: act_fn(s).clamp(-ACTION_CLIP, ACTION_CLIP)  # noqa: E731
    obs, actions = [start_obs], [act(start_obs)]
    for _ in range(horizon - 1):
        obs.append(ensemble.step(obs[-1], actions[-1], generator, deterministic=True)[0])
        actions.append(act(obs[-1]))
    obs, actions = torch.stack(obs, 1), torch.stack(actions, 1)
    known = state_model_known(horizon, obs.shape[-1], actions.shape[-1])[None]
    for _ in range(iterations):
        values = sampler.normalizer.normalize(torch.cat([obs, torch.atanh(actions)], -1))
        x = sampler.normalizer.unnormalize(sampler(len(obs), horizon, generator, inpaint=(known, values)))
        obs = torch.cat([start_obs[:, None], (x[:, 1:, :obs.shape[-1]] + obs[:, 1:]) / 2], 1)  # s_0 stays exact
        actions = act(obs)
    return dict(obs=obs, actions=actions)


# SHARED END: dydiff


# ALGO LOGIC: the simulator probe
VELOCITY_CLIP = {"HalfCheetahEnv": None, "HopperEnv": 10.0, "Walker2dEnv": 10.0}  # obs = qpos[1:] + clip(qvel)


class SimulatorProbe:
    """Ground-truth one-step dynamics from observations. MuJoCo locomotion envs (obs = qpos[1:] + qvel, velocities
    clipped to +-10 for Hopper/Walker2d): the state is set with rootx = 0 (the dynamics do not depend on it), the env
    stepped with the action, and its next observation and reward returned; states with an observed velocity at the
    clip are flagged: their true velocity is unknown, so their error is not counted. PointMaze (flat obs = achieved
    goal, desired goal, [x, y, vx, vy] in the Dict space's key order): qpos = (x, y), qvel = (vx, vy) and the goal set
    from the row; nothing is lost in its observation, so no state is flagged."""

    def __init__(self, env: gym.Env, clip_tolerance: float = 1e-3):
        import mujoco
        self.mujoco, self.env, self.u = mujoco, env, env.unwrapped
        name = type(self.u).__name__
        self.maze = name == "PointMazeEnv"
        if self.maze:
            env.reset(seed=0)  # the maze env steps only after a reset
            self.keys = list(env.observation_space.spaces)
            self.sizes = [env.observation_space[k].shape[0] for k in self.keys]
            self.obs_dim, self.clip, self.tol = sum(self.sizes), None, clip_tolerance
            # the desired goal is the task, not the state: a dataset's goal is replaced when reached, which no
            # simulator step predicts, so the dynamics error counts the other channels only
            starts = dict(zip(self.keys, np.cumsum([0] + self.sizes)))
            self.dims = np.array([i for i in range(self.obs_dim)
                                  if not starts["desired_goal"] <= i < starts["desired_goal"] + 2])
            return
        if name not in VELOCITY_CLIP:
            raise SystemExit(f"error: the dynamics probe supports {', '.join(VELOCITY_CLIP)} and PointMazeEnv, "
                             f"not {name}")
        self.nq, self.nv = self.u.model.nq, self.u.model.nv
        self.obs_dim, self.clip, self.tol = self.nq - 1 + self.nv, VELOCITY_CLIP[name], clip_tolerance
        self.dims = np.arange(self.obs_dim)  # the observation channels the dynamics error counts

    def flagged(self, obs: np.ndarray) -> np.ndarray:
        if self.clip is None:
            return np.zeros(obs.shape[:-1], dtype=bool)
        return (np.abs(obs[..., self.nq - 1:]) >= self.clip - self.tol).any(-1)

    def step(self, obs: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """obs [N, obs_dim], actions [N, act_dim] -> simulator next obs [N, obs_dim], rewards [N], valid [N] (not
        flagged and finite; invalid rows are NaN)."""
        obs, actions = np.asarray(obs, np.float64), np.asarray(actions, np.float64)
        valid = ~self.flagged(obs) & np.isfinite(obs).all(-1) & np.isfinite(actions).all(-1)
        next_obs, rewards = np.full(obs.shape, np.nan), np.full(len(obs), np.nan)
        for i in np.flatnonzero(valid):
            if self.maze:
                parts = dict(zip(self.keys, np.split(obs[i], np.cumsum(self.sizes)[:-1])))
                point = self.u.point_env
                self.mujoco.mj_resetData(point.model, point.data)
                point.set_state(parts["observation"][:2], parts["observation"][2:4])
                self.u.goal = parts["desired_goal"].copy()
                nxt, rewards[i], *_ = self.u.step(np.clip(actions[i], -1, 1))
                next_obs[i] = np.concatenate([np.asarray(nxt[k], np.float64).reshape(-1) for k in self.keys])
                continue
            self.mujoco.mj_resetData(self.u.model, self.u.data)  # no warm start carried over from another state
            self.u.set_state(np.concatenate([[0.0], obs[i, :self.nq - 1]]), obs[i, self.nq - 1:])
            next_obs[i], rewards[i], *_ = self.u.step(np.clip(actions[i], -1, 1))
        return next_obs, rewards, valid


# ALGO LOGIC: trajectories of each method, as dict(obs [N, k+1, o], actions [N, k, a], rewards [N, k], mask [N, k])
def dataset_trajectories(episodes: list[dict], length: int, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """`n` real sub-trajectories of `length` transitions (uniform over episodes long enough, then over starts)."""
    eligible = [e for e in episodes if len(e["actions"]) >= length]
    if not eligible:
        raise SystemExit(f"error: no episode has {length} transitions; lower --rollout-length")
    out = dict(obs=[], actions=[], rewards=[])
    for i in rng.integers(len(eligible), size=n):
        e = eligible[i]
        s = rng.integers(len(e["actions"]) - length + 1)
        out["obs"].append(e["obs"][s:s + length + 1]), out["actions"].append(e["actions"][s:s + length])
        out["rewards"].append(e["rewards"][s:s + length])
    out = {k: torch.as_tensor(np.stack(v)) for k, v in out.items()}
    return dict(**out, mask=torch.ones(n, length, dtype=torch.bool))


@torch.no_grad()
def pets_rollouts(model: ProbabilisticEnsemble, act_fn: Callable, start_obs: torch.Tensor, length: int,
                  deterministic: bool, generator: torch.Generator) -> dict[str, torch.Tensor]:
    obs, actions, rewards = [start_obs], [], []
    for _ in range(length):
        actions.append(act_fn(obs[-1], deterministic))
        next_obs, reward = model.step(obs[-1], actions[-1], generator)
        obs.append(next_obs), rewards.append(reward)
    return dict(obs=torch.stack(obs, 1).cpu(), actions=torch.stack(actions, 1).cpu(), rewards=torch.stack(rewards, 1).cpu(),
                mask=torch.ones(len(start_obs), length, dtype=torch.bool))


def dydiff_trajectories(sampler: GuidedEDMSampler, model: ProbabilisticEnsemble, act_fn: Callable,
                        starts: torch.Tensor, horizon: int, length: int, iterations: int, batch_size: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """DyDiff rollouts (`dydiff_rollouts`, deterministic policy) from `starts`, cut to `length` transitions; rewards from
    the ensemble's reward head, as DyDiff labels them."""
    act = lambda s: act_fn(s, True)  # noqa: E731
    parts = [dydiff_rollouts(sampler, model, act, starts[b:b + batch_size], horizon, iterations, generator)
             for b in range(0, len(starts), batch_size)]
    obs, actions = (torch.cat([p[k] for p in parts]) for k in ("obs", "actions"))
    obs, actions = obs[:, :length + 1], actions[:, :length]
    return dict(obs=obs.cpu(), actions=actions.cpu(), rewards=model.reward(obs[:, :-1], actions).cpu(),
                mask=torch.ones(len(obs), length, dtype=torch.bool))


def trajectories_from_windows(x: torch.Tensor, obs_dim: int, act_dim: int, length: int) -> dict[str, torch.Tensor]:
    """Unnormalised windows [N, H, obs+act+2] -> trajectories of `length` transitions (row t -> row t+1). A transition
    counts only if no row up to and including t is terminal (a terminal row has no successor in the window)."""
    dones = x[:, :length, -1] > 0.5
    return dict(obs=x[:, :length + 1, :obs_dim].cpu(), actions=torch.tanh(x[:, :length, obs_dim:obs_dim + act_dim]).cpu(),
                rewards=x[:, :length, -2].cpu(), mask=(dones.cumsum(1) == 0).cpu())


def pgd_trajectories(sampler: GuidedEDMSampler, coef: float, log_prob_fn: Optional[Callable], n: int, horizon: int,
                     length: int, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`n` trajectories of `horizon` rows from the shared guided EDM sampler at guidance coefficient `coef` (0:
    unguided), cut to `length` transitions."""
    chunks = []
    for b in range(0, n, batch_size):
        x = sampler.normalizer.unnormalize(sampler(min(batch_size, n - b), horizon, generator, log_prob_fn, coef))
        chunks.append(trajectories_from_windows(x, sampler.obs_dim, sampler.act_dim, length))
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


# ALGO LOGIC: diagnostics
@torch.no_grad()
def diagnostics(traj: dict[str, torch.Tensor], probe: SimulatorProbe, log_prob_fn: Callable, obs_var: np.ndarray,
                device: torch.device) -> dict:
    """Per rollout step t = 1..k (the transition s_{t-1}, a_{t-1} -> s_t) and overall:
    dyn_mse   mean over obs dims (`probe.dims`: PointMaze's desired goal left out) of (s_t - sim(s_{t-1}, a_{t-1}))^2
    dyn_nmse  the same with each dim divided by the dataset's obs variance
    reward_se (r_{t-1} - simulator reward)^2
    action_loglik  log pi_target(a_{t-1} | s_{t-1})
    Dynamics metrics count valid transitions only (inside the trajectory, finite, not flagged at the velocity clip)."""
    obs, actions, rewards, mask = traj["obs"], traj["actions"], traj["rewards"], traj["mask"]
    n, k, od = actions.shape[0], actions.shape[1], obs.shape[-1]
    s = obs[:, :-1].reshape(-1, od).numpy()
    sim_next, sim_r, ok = probe.step(s, actions.reshape(n * k, -1).numpy())
    synth_next = obs[:, 1:].reshape(-1, od).numpy().astype(np.float64)
    ok &= mask.reshape(-1).numpy() & np.isfinite(synth_next).all(-1)
    sq = np.where(ok[:, None], (synth_next - sim_next) ** 2, 0.0)[:, probe.dims]
    per = dict(dyn_mse=sq.mean(-1), dyn_nmse=(sq / obs_var[probe.dims]).mean(-1),
               reward_se=np.where(ok, (rewards.reshape(-1).numpy() - sim_r) ** 2, 0.0))
    logp = log_prob_fn(obs[:, :-1].to(device), actions.to(device)).cpu().numpy().reshape(-1)
    in_traj = mask.reshape(-1).numpy() & np.isfinite(logp)
    per["action_loglik"] = np.where(in_traj, logp, 0.0)
    flagged = mask.reshape(-1).numpy() & probe.flagged(s)
    out = {}
    for name, v in per.items():
        w = (in_traj if name == "action_loglik" else ok).reshape(n, k)
        v = v.reshape(n, k)
        out[name] = (v.sum(0) / np.maximum(w.sum(0), 1)).tolist()  # per step
        out[name + "_mean"] = float(v.sum() / max(w.sum(), 1))
    out.update(valid_transitions=int(ok.sum()), transitions=int(mask.sum()), trajectories=n,
               flagged_fraction=float(flagged.sum() / max(int(mask.sum()), 1)))
    return out


def report_steps(args: Args, length: int) -> list[int]:
    return sorted({t for t in args.report_steps if 1 <= t <= length} | {length})


def write_table(rows: list[dict], steps: list[int], path: str):
    cols = ["policy", "method", "guidance_coef", "trajectories", "transitions", "valid_transitions", "flagged_fraction",
            "action_loglik_mean", "dyn_mse_mean", "dyn_nmse_mean", "reward_se_mean", "time_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols + [f"dyn_mse@{t}" for t in steps] + [f"dyn_nmse@{t}" for t in steps])
        for r in rows:
            w.writerow([r[c] for c in cols] + [r["dyn_mse"][t - 1] for t in steps] + [r["dyn_nmse"][t - 1] for t in steps])
    lines = ["| policy | method | coef | action log-lik | " + " | ".join(f"dyn MSE @{t}" for t in steps) + " | dyn MSE mean |",
             "|---" * (5 + len(steps)) + "|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['method']} | {r['guidance_coef']:g} | {r['action_loglik_mean']:.4f} | "
                     + " | ".join(f"{r['dyn_mse'][t - 1]:.3g}" for t in steps) + f" | {r['dyn_mse_mean']:.3g} |")
    with open(os.path.splitext(path)[0] + ".md", "w") as f:  # the same table for a report
        f.write("\n".join(lines) + "\n")


def plot(rows: list[dict], run_dir: str) -> list[str]:
    """Figure 5: action log-likelihood under each target policy vs the guidance coefficient (PETS and the data as
    reference lines). Figure 6: dynamics error per rollout step, one panel per target policy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, p in enumerate(policies):
        c = colors[i % len(colors)]
        pgd = sorted((r["guidance_coef"], r["action_loglik_mean"]) for r in rows if r["policy"] == p and r["method"] == "pgd")
        if pgd:
            ax.plot([max(x, 1e-3) for x, _ in pgd], [y for _, y in pgd], "o-", color=c, label=f"PGD ({p})")
        for method, style in (("pets", "--"), ("dydiff", "-."), ("dataset", ":")):
            for r in rows:
                if r["policy"] == p and r["method"] == method:
                    ax.axhline(r["action_loglik_mean"], ls=style, color=c, label=f"{method} ({p})")
    ax.set_xscale("log")
    ax.set_xlabel("guidance coefficient (0 drawn at 1e-3)")
    ax.set_ylabel("mean log pi_target(a|s)")
    ax.set_title("Action likelihood under the target policy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    paths = [os.path.join(run_dir, "figure5_action_likelihood.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(policies), figsize=(5 * len(policies), 4), squeeze=False)
    for ax, p in zip(axes[0], policies):
        for r in rows:
            if r["policy"] != p:
                continue
            label = f"PGD lambda={r['guidance_coef']:g}" if r["method"] == "pgd" else r["method"].upper()
            y = np.maximum(np.asarray(r["dyn_mse"], dtype=float), 1e-12)
            ax.plot(np.arange(1, len(y) + 1), y, {"pets": "--", "dydiff": "-."}.get(r["method"], "-"), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("rollout step")
        ax.set_ylabel("dynamics MSE vs simulator")
        ax.set_title(p, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(os.path.join(run_dir, "figure6_dynamics_error.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def policy_names(args: Args) -> list[str]:
    names = list(args.policy_names) or [
        os.path.basename(os.path.dirname(os.path.abspath(p))) if os.path.basename(p) == "policy.pt"
        else os.path.splitext(os.path.basename(p))[0] for p in args.policy_checkpoints]
    if len(names) != len(args.policy_checkpoints):
        raise SystemExit("error: --policy-names must name every --policy-checkpoints entry")
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


# valid range of every numeric field
RANGES = dict(torch_threads="[1, inf)", guidance_coefs="[0, inf)", sampler_steps="[1, inf)", sigma_min="(0, inf)",
              sigma_max="(0, inf)", rho="(0, inf)", S_churn="[0, inf)", S_tmin="[0, inf)", S_tmax="[0, inf)",
              S_noise="(0, inf)", guidance_cosine="(-inf, inf)", sample_horizon="[2, inf)", sample_batch_size="[1, inf)",
              ensemble_size="[1, inf)", num_elites="[1, inf)", dynamics_hidden="[1, inf)", dynamics_layers="[1, inf)",
              dynamics_lr="(0, inf)", dynamics_weight_decay="[0, inf)", dynamics_batch_size="[1, inf)",
              dynamics_steps="[1, inf)", dynamics_eval_every="[1, inf)", dynamics_patience="[1, inf)",
              dynamics_val_fraction="(0, 1)", dynamics_max_holdout="[1, inf)", logvar_loss_coef="[0, inf)",
              num_trajectories="[1, inf)", rollout_length="[1, inf)", report_steps="[1, inf)", clip_tolerance="[0, inf)",
              dydiff_iterations="[0, inf)", dydiff_sampler_steps="[1, inf)")


# SHARED BEGIN: run_dirs
def atomic_json(obj: dict, path: str):
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(f"{path}.tmp", path)


def make_run_dir(args: Args) -> str:
    """A new run dir `{env}__{exp}__{seed}__{time}`, with a `_k` suffix when runs started in the same second collide."""
    name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    base = os.path.join(args.runs_root, name)
    for k in range(1000):
        run_dir = f"{base}_{k}" if k else base
        try:
            os.makedirs(run_dir, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
        except OSError as e:
            raise SystemExit(f"error: cannot create run dir {run_dir} ({e.strerror}); "
                             f"pass a writable --runs-root") from None
    raise SystemExit(f"error: 1000 run dirs {base}_* exist already; pass another --runs-root")


# SHARED END: run_dirs


def main(args: Args) -> dict:
    check_ranges(args, RANGES)
    if not args.policy_checkpoints:
        raise SystemExit("error: pass at least one --policy-checkpoints (a policy.pt of pgd_iql.py/pgd_td3bc.py "
                         "--save-model, or a collect_datasets.py policy)")
    if not 1 <= args.num_elites <= args.ensemble_size:
        raise SystemExit(f"error: --num-elites must be in [1, --ensemble-size], got {args.num_elites}")
    start = time.time()
    dataset = load_dataset(args.env_id)
    dataset_id = dataset.spec.dataset_id
    episodes = episodes_from_minari(dataset)
    obs_dim, act_dim = episodes[0]["obs"].shape[1], episodes[0]["actions"].shape[1]
    probe = SimulatorProbe(dataset.recover_environment(), args.clip_tolerance)
    if probe.obs_dim != obs_dim:
        raise SystemExit(f"error: {dataset_id} has {obs_dim} obs dims, its env's state gives {probe.obs_dim}")
    device = torch.device(args.device)
    names = policy_names(args)
    policies = [load_policy(p, device, obs_dim, act_dim) for p in args.policy_checkpoints]
    sampler, horizon = None, None
    if args.diffuser_checkpoint:
        denoiser, normalizer, ckpt = load_diffuser(args.diffuser_checkpoint, device)
        if ckpt["data_dim"] != obs_dim + act_dim + 2:
            raise SystemExit(f"error: diffuser {args.diffuser_checkpoint} models {ckpt['data_dim']} channels, dataset "
                             f"{dataset_id} has {obs_dim + act_dim + 2}; pass the checkpoint of this dataset")
        if ckpt["dataset_id"] != dataset_id:
            print(f"warning: the diffuser was trained on {ckpt['dataset_id']}, the dynamics model on {dataset_id}")
        sampler = GuidedEDMSampler(denoiser, normalizer, obs_dim, act_dim, **{k: getattr(args, k) for k in SAMPLER_FIELDS})
        horizon = args.sample_horizon or ckpt["config"]["horizon"]
    dydiff, dydiff_horizon = None, None
    if args.dydiff_checkpoint:
        denoiser, normalizer, ckpt = load_diffuser(args.dydiff_checkpoint, device)
        if ckpt.get("kind") != "dydiff_state_model" or ckpt["data_dim"] != obs_dim + act_dim:
            raise SystemExit(f"error: {args.dydiff_checkpoint} is not a DyDiff state model of this dataset's "
                             f"{obs_dim} + {act_dim} channels; pass the state_model.pt of a dydiff_td3bc.py run")
        dydiff = GuidedEDMSampler(denoiser, normalizer, obs_dim, act_dim,
                                  **{**DYDIFF_SAMPLER, "sampler_steps": args.dydiff_sampler_steps, "compile": args.compile})
        dydiff_horizon = ckpt["config"]["horizon"]
    longest = min(h - 1 for h in (horizon, dydiff_horizon) if h) if horizon or dydiff_horizon else None
    length = args.rollout_length or longest or 31
    if longest and not 1 <= length <= longest:
        raise SystemExit(f"error: --rollout-length must be in [1, {longest}] (the sampled lengths - 1)")

    run_dir = make_run_dir(args)
    run_name = os.path.basename(run_dir)
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"{dataset_id}: {len(episodes)} episodes, obs_dim {obs_dim}, act_dim {act_dim}; {len(names)} target "
          f"policies; rollouts of {length} transitions")

    # dynamics ensemble
    if args.dynamics_checkpoint:
        if not os.path.isfile(args.dynamics_checkpoint):
            raise SystemExit(f"error: --dynamics-checkpoint {args.dynamics_checkpoint} does not exist")
        try:
            saved = torch.load(args.dynamics_checkpoint, map_location=device, weights_only=True)
            c = saved["config"]
            model = ProbabilisticEnsemble(obs_dim, act_dim, c["ensemble_size"], c["dynamics_hidden"],
                                          c["dynamics_layers"], c["num_elites"]).to(device)
            model.load_state_dict(saved["state_dict"])
            dyn_info = dict(saved["info"], loaded_from=args.dynamics_checkpoint)
        except Exception as e:
            raise SystemExit(f"error: --dynamics-checkpoint {args.dynamics_checkpoint} is not a dynamics model of "
                             f"this dataset's shapes ({type(e).__name__}); pass the dynamics.pt of a pets_baseline.py "
                             f"run on {dataset_id}, or leave the flag out to train one") from None
    else:
        model, dyn_info = train_ensemble(args, episodes, writer, device)
    config = {k: getattr(args, k) for k in ("ensemble_size", "num_elites", "dynamics_hidden", "dynamics_layers")}
    atomic_torch_save(dict(state_dict=model.state_dict(), config=config, info=dyn_info, dataset_id=dataset_id),
                      os.path.join(run_dir, "dynamics.pt"))

    # ALGO LOGIC: trajectories of every method, measured under every target policy
    all_obs = torch.as_tensor(np.concatenate([e["obs"][:-1] for e in episodes]))
    obs_var = np.maximum(all_obs.double().var(0).numpy(), 1e-6)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    n = args.num_trajectories
    shared = {("dataset", 0.0): (dataset_trajectories(episodes, length, n, rng), 0.0)}
    if sampler is not None and 0.0 in args.guidance_coefs:
        t0 = time.time()
        shared[("pgd", 0.0)] = (pgd_trajectories(sampler, 0.0, None, n, horizon, length, args.sample_batch_size, gen),
                                time.time() - t0)
    rows = []
    for name, (act_fn, log_prob_fn) in zip(names, policies):
        trajs = dict(shared)
        t0 = time.time()
        starts = all_obs[torch.randint(len(all_obs), (n,), generator=gen)].to(device)
        trajs[("pets", 0.0)] = (pets_rollouts(model, act_fn, starts, length, args.deterministic_rollouts, gen), time.time() - t0)
        if dydiff is not None:  # the same start states; the first trajectory from this run's ensemble
            t0 = time.time()
            trajs[("dydiff", 0.0)] = (dydiff_trajectories(dydiff, model, act_fn, starts, dydiff_horizon, length,
                                                          args.dydiff_iterations, args.sample_batch_size, gen),
                                      time.time() - t0)
        for coef in args.guidance_coefs:
            if coef != 0 and sampler is not None:
                t0 = time.time()
                trajs[("pgd", coef)] = (pgd_trajectories(sampler, coef, log_prob_fn, n, horizon, length,
                                                         args.sample_batch_size, gen), time.time() - t0)
        for (method, coef), (traj, seconds) in trajs.items():
            row = dict(policy=name, method=method, guidance_coef=coef, time_s=round(seconds, 2),
                       **diagnostics(traj, probe, log_prob_fn, obs_var, device))
            rows.append(row)
            tag = f"{name}/{method}" + (f"_{coef:g}" if method == "pgd" else "")  # pets, dydiff, dataset: no coef
            for t, v in enumerate(row["dyn_mse"], 1):
                writer.add_scalar(f"dyn_mse/{tag}", v, t)
            writer.add_scalar(f"action_loglik/{tag}", row["action_loglik_mean"], 0)
            print(f"{name:>24} {method:>7} {coef:>5g}: action loglik {row['action_loglik_mean']:8.2f}  dyn MSE "
                  f"step1 {row['dyn_mse'][0]:.3g} last {row['dyn_mse'][-1]:.3g} mean {row['dyn_mse_mean']:.3g}  "
                  f"flagged {row['flagged_fraction']:.1%}")

    steps = report_steps(args, length)
    write_table(rows, steps, os.path.join(run_dir, "table.csv"))
    figures = plot(rows, run_dir)
    summary = dict(env_id=args.env_id, dataset_id=dataset_id, diffuser_checkpoint=args.diffuser_checkpoint,
                   dydiff_checkpoint=args.dydiff_checkpoint,
                   policies=dict(zip(names, args.policy_checkpoints)), rollout_length=length, report_steps=steps,
                   dynamics=dyn_info, rows=rows, figures=[os.path.basename(f) for f in figures],
                   wall_time_s=time.time() - start, args=dataclasses.asdict(args))
    atomic_json(summary, os.path.join(run_dir, "results.json"))
    writer.close()
    print(f"wrote table.csv/.md, results.json and {len(figures)} figures to {run_dir} ({summary['wall_time_s']:.0f}s)")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
