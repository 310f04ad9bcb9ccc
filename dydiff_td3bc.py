"""DyDiff (Zhao et al., 2024, "Long-Horizon Rollout via Dynamics Diffusion for Offline RL"; code FineArtz/DyDiff) with
TD3+BC, in one file, on the data, diffuser budget, agent and evaluation of pgd_td3bc.py so the two can be compared.

1. A one-step PETS ensemble (the design of pets_baseline.py) and an action-conditioned state model: EDM on windows of
   [obs, arctanh(action)] where s_0 and every action are given clean (inpainting) in training and after every
   sampler step, so the model learns p(s_1..H | s_0, a_0..H-1).
2. Rollouts from real start states: the first trajectory is the learning policy rolled out (deterministically) in the
   ensemble; then M times (`--iterations`) a full sampling pass with s_0 and the actions clamped, the states averaged
   with the previous ones, and the actions relabelled a_t = pi(s_t).
3. Rewards from the ensemble's reward head, terminals from the gymnasium v5 env's own health conditions, the best
   `--keep-fraction` (60%) of the trajectories by summed reward kept, all their transitions (up to a terminal) added to
   a ring buffer, refreshed every `--rollout-every` agent steps.
4. TD3+BC (the agent of pgd_td3bc.py, word for word) on batches of `--real-ratio` (60%) real and 40% synthetic data
   (all real while the buffer holds fewer than a batch's share).
Usage: python dydiff_td3bc.py --env-id maze2d-umaze
The README's "DyDiff" section lists the algorithm as implemented here and every departure from the authors' code.
Blocks between `# SHARED BEGIN: x` and `# SHARED END: x` are copied word for word from the other scripts
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


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (numpy, torch, sampler noise, evaluation episodes)"""
    env_id: str = "hopper-medium-replay"
    """dataset: a short name of collect_datasets.py's table (e.g. `walker2d-medium-replay`) or a Minari id"""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """torch device"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True` and deterministic algorithms where available"""
    runs_root: str = "runs"
    """folder for the run directories `{runs_root}/{env}__{exp}__{seed}__{time}`"""
    track: bool = False
    """if toggled, log to Weights and Biases (imported only then)"""
    wandb_project_name: str = "pgd"
    """the wandb project name"""
    save_model: bool = False
    """if toggled, save the final agent, its policy checkpoint and the state model to the run dir"""
    checkpoint_every: int = 0
    """agent steps between atomic checkpoints of the whole run (`checkpoint.pt` in its run dir: the ensemble, the state
    model, the agent, the ring buffer, the RNG states; 0: only when stopped by SIGTERM/SIGUSR2, e.g. a SLURM
    preemption); --resume continues from it"""
    resume: bool = False
    """continue the newest unfinished run of this --env-id/--exp-name/--seed under --runs-root from its checkpoint
    (a new run when there is none; a finished one is reported, not rerun)"""

    # Action-conditioned state model (EDM over [obs, arctanh(action)] windows; s_0 and the actions inpainted)
    horizon: int = 32
    """rows of the model's windows and of every rollout (DyDiff's README: 100; pgd_td3bc.py's CPU preset: 32)"""
    window_stride: int = 8
    """stride between windows of an episode (DyDiff: 1)"""
    val_fraction: float = 0.05
    """fraction of episodes held out for the model's validation loss"""
    unet: Literal["residual", "plain"] = "residual"
    """U-Net type (the shared U-Nets of pgd_td3bc.py)"""
    diffuser_channels: int = 64
    """U-Net width (DyDiff: 128)"""
    diffuser_mults: tuple[int, ...] = (1, 2, 2)
    """U-Net channel multiplier per level (DyDiff: 1, 4, 8)"""
    diffuser_kernel_size: int = 3
    """temporal convolution kernel size (DyDiff: 5)"""
    diffuser_steps: int = 20_000
    """state-model training steps (ignored when --diffuser-epochs > 0)"""
    diffuser_epochs: int = 0
    """if > 0, train for this many passes over the training windows instead"""
    diffuser_batch_size: int = 64
    """batch size (windows)"""
    diffuser_lr: float = 3e-4
    """peak learning rate (Adam; linear warmup then cosine decay to 0)"""
    diffuser_warmup: float = 0.025
    """fraction of the training steps spent warming the learning rate up"""
    diffuser_warmup_start: float = 0.0
    """learning rate at the first warmup step, as a fraction of the peak"""
    ema_decay: float = 0.999
    """EMA decay of the weights used for sampling"""
    ema_every: int = 1
    """update the EMA weights every this many training steps"""
    sigma_data: float = 1.0
    """EDM sigma_data; the channels are z-scored, so 1 (DyDiff: 0.5 on data min-max scaled to [-1, 1])"""
    P_mean: float = -1.2
    """EDM training noise distribution: ln(sigma) ~ N(P_mean, P_std^2)"""
    P_std: float = 1.2
    """EDM training noise distribution: ln(sigma) ~ N(P_mean, P_std^2)"""
    clean_known_input: bool = True
    """the clamped entries (s_0, the actions) enter the U-Net clean and unscaled at every noise level, in training and
    sampling; `--no-clean-known-input` is DyDiff's own conditioning (EDM's input scaling shrinks them by 1/sqrt(sigma^2
    + sigma_data^2), the churn noises them), which at this harness's training budget ignores s_0 at high noise (README,
    *DyDiff*). A loaded --state-model-checkpoint keeps its own."""
    state_model_checkpoint: Optional[str] = None
    """reuse this state model (`state_model.pt` of a --save-model run) instead of training one"""
    sampler_steps: int = 34
    """Heun steps of the sampler (DyDiff: 34, S_churn 60, S_min 0.37, S_max 52.24, S_noise 1.002)"""
    compile: bool = torch.cuda.is_available()
    """torch.compile the sampler step and the state model's training step (default: on with CUDA)"""
    compile_agent: bool = True
    """torch.compile the agent's whole update (losses, gradients, Adam, target updates) into one graph per step
    method, CUDA graphs on CUDA; the same results as eager within float tolerance"""
    compile_agent_min_steps: int = 20_000
    """on CPU, runs of fewer --total-steps stay eager: the 20-30 s compilation would not pay (README, bench)"""

    # PETS ensemble (the first trajectory; its reward head is the reward model)
    ensemble_size: int = 7
    """ensemble members (DyDiff: 7)"""
    num_elites: int = 5
    """members with the lowest held-out error used for rollouts (DyDiff: 5)"""
    dynamics_hidden: int = 200
    """hidden width of each member"""
    dynamics_layers: int = 4
    """hidden layers of each member"""
    dynamics_lr: float = 1e-3
    """Adam learning rate"""
    dynamics_weight_decay: float = 5e-5
    """Adam weight decay"""
    dynamics_batch_size: int = 256
    """batch size per member"""
    dynamics_steps: int = 20_000
    """maximum training steps"""
    dynamics_eval_every: int = 500
    """held-out evaluation interval (steps)"""
    dynamics_patience: int = 5
    """stop after this many evaluations without a member improving by > 1%"""
    dynamics_val_fraction: float = 0.1
    """fraction of episodes held out"""
    dynamics_max_holdout: int = 10_000
    """at most this many held-out transitions"""
    logvar_loss_coef: float = 0.01
    """weight of the log-variance bound term"""

    # DyDiff rollouts
    iterations: int = 2
    """policy-injection iterations M (DyDiff's README: 2; 0: the ensemble's trajectory as is)"""
    rollout_batch: int = 2048
    """trajectories per generation, from uniformly drawn real start states (DyDiff: 2048)"""
    rollout_every: int = 10_000
    """generate every this many agent steps (DyDiff: every 500-step epoch; far too slow on a CPU)"""
    keep_fraction: float = 0.6
    """keep this fraction of each generation's trajectories, those of highest summed reward (DyDiff: 0.6, hardmax)"""
    buffer_size: int = 2_000_000
    """synthetic ring buffer (transitions; DyDiff: 2M)"""
    sample_batch_size: int = 256
    """trajectories per sampler batch"""

    # Offline RL loop (as pgd_td3bc.py)
    total_steps: int = 1_000_000
    """agent gradient steps"""
    batch_size: int = 256
    """agent batch size"""
    real_ratio: float = 0.6
    """fraction of each batch drawn from the real data (DyDiff: 0.6); all real while the buffer is too small"""
    eval_every: int = 10_000
    """evaluate every this many steps"""
    eval_episodes: int = 10
    """evaluation episodes (vectorised)"""
    log_every: int = 1_000
    """log losses every this many steps"""

    # Agent (TD3+BC; the fields of pgd_td3bc.py)
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network polyak rate"""
    learning_rate: float = 3e-4
    """learning rate of actor and critics"""
    adam_eps: float = 1e-8
    """Adam epsilon of every agent optimiser"""
    hidden_dim: int = 256
    """hidden width of the MLPs"""
    alpha: float = 2.5
    """TD3+BC weight: actor loss = -alpha / mean|Q| * Q(s, pi(s)) + (pi(s) - a)^2"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    critic_updates: int = 1
    """critic updates per agent step (official PGD: 2)"""
    policy_freq: int = 2
    """actor (and target) update every this many agent steps"""
    normalize_obs: bool = True
    """normalise observations with the real dataset's mean/std"""


RANGES = dict(horizon="[2, inf)", window_stride="[1, inf)", val_fraction="[0, 1)", diffuser_channels="[1, inf)",
              diffuser_mults="[1, inf)", diffuser_kernel_size="[1, inf)", diffuser_steps="[1, inf)",
              diffuser_epochs="[0, inf)", diffuser_batch_size="[1, inf)", diffuser_lr="(0, inf)", diffuser_warmup="[0, 1]",
              diffuser_warmup_start="[0, 1]", ema_decay="[0, 1)", ema_every="[1, inf)", sigma_data="(0, inf)",
              P_mean="(-inf, inf)", P_std="(0, inf)", sampler_steps="[1, inf)", ensemble_size="[1, inf)",
              num_elites="[1, inf)", dynamics_hidden="[1, inf)", dynamics_layers="[1, inf)", dynamics_lr="(0, inf)",
              dynamics_weight_decay="[0, inf)", dynamics_batch_size="[1, inf)", dynamics_steps="[1, inf)",
              dynamics_eval_every="[1, inf)", dynamics_patience="[1, inf)", dynamics_val_fraction="[0, 1)",
              dynamics_max_holdout="[1, inf)", logvar_loss_coef="[0, inf)", iterations="[0, inf)", checkpoint_every="[0, inf)",
              compile_agent_min_steps="[0, inf)",
              rollout_batch="[1, inf)", rollout_every="[1, inf)", keep_fraction="(0, 1]", buffer_size="[1, inf)",
              sample_batch_size="[1, inf)", total_steps="[1, inf)", batch_size="[1, inf)", real_ratio="[0, 1]",
              eval_every="[1, inf)", eval_episodes="[1, inf)", log_every="[1, inf)", gamma="[0, 1]", tau="(0, 1]",
              learning_rate="(0, inf)", adam_eps="(0, inf)", hidden_dim="[1, inf)", alpha="[0, inf)",
              policy_noise="[0, inf)", noise_clip="[0, inf)", critic_updates="[1, inf)", policy_freq="[1, inf)")


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


# ALGO LOGIC: what DyDiff does with a generation: terminals, rewards, the reward filter, the ring buffer
def terminal_fn(env: gym.Env) -> Callable[[np.ndarray], np.ndarray]:
    """next_obs [..., obs_dim] -> terminated [...] (bool), from the gymnasium v5 env's own health conditions, read from
    the env's attributes: Hopper (z, angle and the state range on obs[1:] = qpos[2:] + qvel), Walker2d (z, angle);
    HalfCheetah never terminates; PointMaze only when episodic (goal within 0.45)."""
    u = env.unwrapped
    name = type(u).__name__
    never = lambda o: np.zeros(o.shape[:-1], dtype=bool)  # noqa: E731
    if name in ("HopperEnv", "Walker2dEnv"):
        if not u._exclude_current_positions_from_observation:
            raise SystemExit(f"error: {name} with x in the observation is not supported (obs[0] must be z)")
        if not u._terminate_when_unhealthy:
            return never
        (z_lo, z_hi), (a_lo, a_hi) = u._healthy_z_range, u._healthy_angle_range
        s_lo, s_hi = getattr(u, "_healthy_state_range", (-np.inf, np.inf))  # Walker2d has no state range

        def unhealthy(o):
            healthy = (z_lo < o[..., 0]) & (o[..., 0] < z_hi) & (a_lo < o[..., 1]) & (o[..., 1] < a_hi)
            return ~(healthy & ((s_lo < o[..., 1:]) & (o[..., 1:] < s_hi)).all(-1))

        return unhealthy
    if name == "HalfCheetahEnv":
        return never
    if name == "PointMazeEnv":
        if u.continuing_task:
            return never
        keys = list(env.observation_space.spaces)
        sizes = dict(zip(keys, np.cumsum([0] + [env.observation_space[k].shape[0] for k in keys])))
        ach, des = sizes["achieved_goal"], sizes["desired_goal"]
        return lambda o: np.linalg.norm(o[..., ach:ach + 2] - o[..., des:des + 2], axis=-1) <= 0.45
    raise SystemExit(f"error: no terminal rule for {name}; DyDiff here supports Hopper, Walker2d, HalfCheetah and "
                     f"PointMaze")


def reward_filter(returns: torch.Tensor, keep: float) -> torch.Tensor:
    """bool [B]: the trajectories whose summed reward is at least the (1 - keep) quantile (DyDiff's hardmax filter)."""
    return returns >= torch.quantile(returns, 1 - keep)


@torch.no_grad()
def dydiff_transitions(traj: dict[str, torch.Tensor], ensemble: "ProbabilisticEnsemble", terminal: Callable,
                       keep: float) -> tuple[dict[str, torch.Tensor], dict]:
    """A generation [B, H] -> its transitions (s_t, a_t, r(s_t, a_t), s_{t+1}, d_t = terminal(s_{t+1})) of the kept
    trajectories, each up to and including its first terminal; and statistics of the generation."""
    obs, actions = traj["obs"], traj["actions"]
    rewards = ensemble.reward(obs, actions)  # [B, H]: every row, as DyDiff sums r over the whole rollout to filter
    kept = reward_filter(rewards.sum(1), keep)
    dones = torch.as_tensor(terminal(obs[:, 1:].cpu().numpy()), device=obs.device).float()
    mask = ((dones.cumsum(1) - dones) == 0) & kept[:, None]  # rows after a terminal are no part of the trajectory
    out = dict(obs=obs[:, :-1][mask], actions=actions[:, :-1][mask], rewards=rewards[:, :-1][mask],
               next_obs=obs[:, 1:][mask], dones=dones[mask])
    stats = dict(kept=int(kept.sum()), transitions=int(mask.sum()), terminal_rate=float(dones[mask].mean()) if mask.any()
                 else 0.0, mean_length=float(mask.sum(1)[kept].float().mean()), reward_mean=float(rewards[kept].mean()))
    return out, stats


@torch.no_grad()
def state_model_check(sampler: GuidedEDMSampler, windows: torch.Tensor, generator: torch.Generator,
                      sigmas: tuple[float, ...] = (0.1, 1.0, 10.0, 80.0)) -> dict:
    """How well the state model does its one job on held-out windows [N, H, obs + act] (env units, arctanh actions):
    given s_0 and the windows' own actions, the mean squared error of its states per step against the real ones; and
    the denoising error of the step-1 states at a few noise levels (known entries clean): a model that reads s_0 has a
    small error even at sigma 80, one that ignores it about 1 (the prior's). Normalised units, state channels."""
    obs_dim, horizon, device = sampler.obs_dim, windows.shape[1], sampler.normalizer.mean.device
    x = sampler.normalizer.normalize(windows.to(device))
    known = state_model_known(horizon, obs_dim, sampler.act_dim).to(device)[None].expand_as(x)
    out = sampler(len(x), horizon, generator, inpaint=(known, x))
    denoise = {}
    for sigma in sigmas:
        noisy = torch.where(known, x, x + torch.randn(x.shape, generator=generator).to(device) * sigma)
        d = sampler.denoiser(noisy, torch.tensor(sigma, device=device), known)
        denoise[f"{sigma:g}"] = float(((d - x)[:, 1, :obs_dim] ** 2).mean())
    return dict(windows=len(x), rollout_mse=((out - x)[..., :obs_dim] ** 2).mean((0, 2)).tolist(),
                step1_denoise_mse=denoise)


class RingBuffer:
    """The synthetic transitions, the oldest overwritten first once `capacity` is reached."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: torch.device):
        shapes = dict(obs=(obs_dim,), actions=(act_dim,), rewards=(), next_obs=(obs_dim,), dones=())
        self.data = {k: torch.zeros((capacity, *s), device=device) for k, s in shapes.items()}
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, batch: dict[str, torch.Tensor]):
        n = len(batch["obs"])
        idx = (self.pos + torch.arange(n, device=batch["obs"].device)) % self.capacity
        for k, v in batch.items():
            self.data[k][idx[-self.capacity:]] = v[-self.capacity:].to(self.data[k].dtype)
        self.pos, self.size = (self.pos + n) % self.capacity, min(self.capacity, self.size + n)

    def sample(self, n: int) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.size, (n,), device=self.data["obs"].device)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict:
        return dict(data={k: v[:self.size].cpu() for k, v in self.data.items()}, size=self.size, pos=self.pos)

    def load_state_dict(self, state: dict):
        for k, v in state["data"].items():
            self.data[k][:state["size"]] = v.to(self.data[k].device)
        self.size, self.pos = state["size"], state["pos"]


# SHARED BEGIN: agent_compile
def resolve_compile_agent(args) -> bool:
    """Whether to compile the agent: --compile-agent, on CPU only for runs of at least --compile-agent-min-steps (the
    measured 1.3-1.4x repays the 20-30 s compilation after ~10k updates; tests and smoke runs stay eager)."""
    return args.compile_agent and (torch.device(args.device).type == "cuda" or args.total_steps >= args.compile_agent_min_steps)


def compile_agent(agent: nn.Module, device: torch.device):
    """--compile-agent: each of the agent's STEPS methods (losses, gradients, Adam, target updates) compiled into one
    graph (compile_step) in agent.compiled, which the agent's update() calls. Call after the agent is on `device` and
    resumed."""
    optimizers = [v for v in vars(agent).values() if isinstance(v, torch.optim.Optimizer)]
    for name in agent.STEPS:
        agent.compiled[name] = compile_step(getattr(agent, name), optimizers, device)


# SHARED END: agent_compile


# SHARED BEGIN: td3bc
# ALGO LOGIC: TD3+BC (Fujimoto & Gu, 2021)
def mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_dim))


class Agent(nn.Module):
    """TD3+BC: deterministic actor mu(s) = tanh(net(s)), twin Q with target policy smoothing, behaviour cloning term.
    Observations are normalised inside (buffers), so every method takes env units.

    Guidance needs a likelihood, and the actor is deterministic: as in the paper's code, pi(a|s) = N(a; mu(s), I), so
    grad_a log pi = -(a - mu(s)) in action (tanh) space; the sampler chains it through the arctanh parameterisation.
    With --normalize-guidance (default) only its direction matters, so one --guidance-coef means the same step length
    for IQL (whose Gaussian has a learned, usually small std) and TD3+BC."""
    STEPS = ("critic_step", "actor_step")  # the methods --compile-agent compiles

    def __init__(self, obs_mean: torch.Tensor, obs_std: torch.Tensor, act_dim: int, *, hidden_dim: int,
                 learning_rate: float, adam_eps: float, gamma: float, tau: float, alpha: float, policy_noise: float,
                 noise_clip: float, critic_updates: int, policy_freq: int):
        super().__init__()
        obs_dim = obs_mean.shape[0]
        self.hidden_dim, self.gamma, self.tau, self.alpha = hidden_dim, gamma, tau, alpha
        self.policy_noise, self.noise_clip, self.critic_updates, self.policy_freq = policy_noise, noise_clip, critic_updates, policy_freq
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32))
        self.actor = mlp(obs_dim, act_dim, hidden_dim)
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, hidden_dim), mlp(obs_dim + act_dim, 1, hidden_dim)
        self.actor_target, self.q1_target, self.q2_target = (
            mlp(d, o, hidden_dim).requires_grad_(False) for d, o in ((obs_dim, act_dim), (obs_dim + act_dim, 1), (obs_dim + act_dim, 1)))
        for target_net, net in self.target_pairs():
            target_net.load_state_dict(net.state_dict())
        adam = dict(lr=learning_rate, eps=adam_eps)
        self.actor_optimizer = torch.optim.Adam(self.actor.parameters(), **adam)
        self.q_optimizer = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], **adam)
        self.num_updates, self.actor_loss, self.bc_loss = 0, torch.zeros(()), torch.zeros(())
        self.compiled: dict[str, Callable] = {}  # compile_agent's versions of STEPS

    def target_pairs(self):
        return (self.actor_target, self.actor), (self.q1_target, self.q1), (self.q2_target, self.q2)

    def norm(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.obs_mean) / self.obs_std

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action mu(s) for evaluation."""
        return torch.tanh(self.actor(self.norm(obs)))

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """log N(a; mu(s), I) summed over action dims, any leading shape; used for guidance and diagnostics."""
        return -0.5 * ((action - self.act(obs)) ** 2 + math.log(2 * math.pi)).sum(-1)

    def q_value(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min of the twin critics Q(s, a), any leading shape (diagnostics: value on real vs synthetic batches)."""
        sa = torch.cat([self.norm(obs), action], -1)
        return torch.min(self.q1(sa), self.q2(sa)).squeeze(-1)

    def update(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One TD3+BC update on batch `b` (env units): critic_steps, then every policy_freq-th time actor_step; both
        compiled whole by --compile-agent. The smoothing noise is drawn here, so eager and compiled draw the same."""
        critic_step, actor_step = (self.compiled.get(name, getattr(self, name)) for name in self.STEPS)
        for _ in range(self.critic_updates):  # on the same batch, fresh smoothing noise each time
            noise = (torch.randn_like(b["actions"]) * self.policy_noise).clamp(-self.noise_clip, self.noise_clip)
            q_loss = critic_step(b["obs"], b["next_obs"], b["actions"], b["rewards"], b["dones"], noise)
        self.num_updates += 1
        if self.num_updates % self.policy_freq == 0:
            self.actor_loss, self.bc_loss = actor_step(b["obs"], b["actions"])
        return {"losses/qf_loss": q_loss, "losses/actor_loss": self.actor_loss, "losses/bc_loss": self.bc_loss}

    def critic_step(self, obs: torch.Tensor, next_obs: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                    dones: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        obs, next_obs = self.norm(obs), self.norm(next_obs)
        with torch.no_grad():  # target policy smoothing, clipped double Q
            next_actions = (torch.tanh(self.actor_target(next_obs)) + noise).clamp(-1, 1)
            next_sa = torch.cat([next_obs, next_actions], -1)
            next_q = torch.min(self.q1_target(next_sa), self.q2_target(next_sa)).squeeze(-1)
            target = rewards + self.gamma * (1 - dones) * next_q
        sa = torch.cat([obs, actions], -1)
        q_loss = F.mse_loss(self.q1(sa).squeeze(-1), target) + F.mse_loss(self.q2(sa).squeeze(-1), target)
        adam_step(self.q_optimizer, q_loss)
        return q_loss.detach()

    def actor_step(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The delayed actor, -lambda Q(s, pi(s)) + BC, then the soft target updates."""
        obs = self.norm(obs)
        pi = torch.tanh(self.actor(obs))
        q = self.q1(torch.cat([obs, pi], -1))
        lmbda = self.alpha / q.abs().mean().detach()
        bc_loss = F.mse_loss(pi, actions)
        actor_loss = -lmbda * q.mean() + bc_loss
        adam_step(self.actor_optimizer, actor_loss)
        with torch.no_grad():
            for target_net, net in self.target_pairs():
                for p_t, p in zip(target_net.parameters(), net.parameters()):
                    p_t.lerp_(p, self.tau)
        return actor_loss.detach(), bc_loss.detach()

    def policy_checkpoint(self) -> dict:
        """A standalone description of the target policy (for pets_baseline.py)."""
        return dict(kind="td3bc_deterministic", obs_dim=self.obs_mean.shape[0], act_dim=self.actor[-1].out_features,
                    hidden=[self.hidden_dim] * 2, state_dict=self.actor.state_dict(), obs_mean=self.obs_mean,
                    obs_std=self.obs_std)


def make_agent(args: Args, act_dim: int, stats: dict) -> Agent:
    """The agent of `args`; `stats` holds the real data's obs_mean/obs_std and episode return_min/return_max."""
    obs_dim = stats["obs_mean"].shape[0]
    return Agent(stats["obs_mean"] if args.normalize_obs else torch.zeros(obs_dim),
                 stats["obs_std"] if args.normalize_obs else torch.ones(obs_dim), act_dim,
                 hidden_dim=args.hidden_dim, learning_rate=args.learning_rate, adam_eps=args.adam_eps, gamma=args.gamma,
                 tau=args.tau, alpha=args.alpha, policy_noise=args.policy_noise, noise_clip=args.noise_clip,
                 critic_updates=args.critic_updates, policy_freq=args.policy_freq)


# SHARED END: td3bc


# SHARED BEGIN: evaluation
@torch.no_grad()
def evaluate(act_fn: Callable[[torch.Tensor], torch.Tensor], dataset, num_episodes: int, seed: int,
             device: torch.device) -> np.ndarray:
    """Returns of `num_episodes` deterministic episodes in the dataset's eval env (one vector env, each sub-env runs
    one episode)."""
    def make_env():
        env = dataset.recover_environment(eval_env=True)
        return gym.wrappers.FlattenObservation(env) if isinstance(env.observation_space, gym.spaces.Dict) else env

    envs = gym.vector.SyncVectorEnv([make_env for _ in range(num_episodes)])
    obs, _ = envs.reset(seed=[seed + i for i in range(num_episodes)])
    returns, done = np.zeros(num_episodes), np.zeros(num_episodes, dtype=bool)
    while not done.all():
        action = act_fn(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * ~done
        done |= terminated | truncated
    envs.close()
    return returns


def normalized_score(dataset, returns: np.ndarray) -> np.ndarray:
    """D4RL-normalised score x100 (raw returns if the dataset carries no reference scores)."""
    import minari
    try:
        return 100 * minari.get_normalized_score(dataset, returns)
    except ValueError:
        return returns


# SHARED END: evaluation


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


# SHARED BEGIN: resume
def resumable_run(args: Args) -> tuple[Optional[str], Optional[dict]]:
    """The newest run dir of this env/exp/seed under --runs-root: (dir, its results.json if it finished), or
    (None, None) when there is none to resume (or the newest failed: a new run starts)."""
    prefix = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__"
    dirs = [os.path.join(args.runs_root, d) for d in os.listdir(args.runs_root) if d.startswith(prefix)] \
        if os.path.isdir(args.runs_root) else []
    for run_dir in sorted(dirs, key=os.path.getmtime, reverse=True):
        if os.path.isfile(os.path.join(run_dir, "results.json")):
            results = json.load(open(os.path.join(run_dir, "results.json")))
            return (None, None) if results.get("status") == "failed" else (run_dir, results)
        if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
            return run_dir, None
    return None, None


def training_state(agent: nn.Module) -> dict:
    """What the agent's state_dict() misses: optimiser and LR-scheduler states, counters, last losses."""
    state = {}
    for k, v in vars(agent).items():
        if isinstance(v, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            state[k] = v.state_dict()
        elif not k.startswith("_") and isinstance(v, (int, float, bool, torch.Tensor)):
            state[k] = v
    return state


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: cannot read the run checkpoint {path} ({type(e).__name__}); delete it (or its run "
                         f"dir) to start the run over") from None


def load_training_state(agent: nn.Module, state: dict):
    for k, v in state.items():
        target = getattr(agent, k)
        if isinstance(target, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)):
            target.load_state_dict(v)
        else:
            setattr(agent, k, v)


def mark_failed(run_dir: str, message: str):
    """results.json of a run that failed: status, the error line, and the checkpoint it leaves (if any)."""
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    atomic_json(dict(status="failed", error=message, checkpoint=checkpoint if os.path.exists(checkpoint) else None),
                os.path.join(run_dir, "results.json"))


def arm_stop_signals() -> tuple[dict, dict]:
    """Stop signals (Ctrl-C; SIGTERM, and submitit's SIGUSR2, before a SLURM preemption): until the training loop sets
    stop["armed"] they interrupt like Ctrl-C; then they are recorded in stop["signals"] and the loop ends at its next
    step with a checkpoint. Returns (stop, the previous handlers for restore_signals)."""
    import signal
    stop = dict(armed=False, signals=[])

    def on_stop(signum, frame):
        if not stop["armed"]:
            raise KeyboardInterrupt
        stop["signals"].append(signum)

    return stop, {sig: signal.signal(sig, on_stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}


def restore_signals(previous: dict):
    import signal
    for sig, handler in previous.items():
        signal.signal(sig, handler)


# SHARED END: resume


def main(args: Args):
    run_start = time.time()
    check_ranges(args, RANGES)
    args = dataclasses.replace(args, compile_agent=resolve_compile_agent(args))
    if args.num_elites > args.ensemble_size:
        raise SystemExit(f"error: --num-elites {args.num_elites} exceeds --ensemble-size {args.ensemble_size}")
    dataset = load_dataset(args.env_id)
    episodes = episodes_from_minari(dataset)  # a broken dataset stops here, before any run dir exists
    run_dir, resumed = resumable_run(args) if args.resume else (None, None)
    if resumed is not None:
        print(f"{args.exp_name} {args.env_id} seed {args.seed}: finished already -> {run_dir}")
        return resumed
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pt")) if run_dir else None
    run_dir = run_dir or make_run_dir(args)
    stop, previous = arm_stop_signals()
    try:
        return train(args, dataset, episodes, run_dir, ckpt, run_start, stop)
    except KeyboardInterrupt:
        mark_failed(run_dir, "interrupted")
        raise SystemExit(f"interrupted: run dir {run_dir} marked failed (results.json)") from None
    except SystemExit as e:
        if isinstance(e.code, str):  # an error after the run dir exists: mark it, keep any checkpoint
            mark_failed(run_dir, e.code)
        raise
    finally:
        restore_signals(previous)


def train(args: Args, dataset, episodes: list[dict], run_dir: str, ckpt: Optional[dict], run_start: float,
          stop: dict) -> dict:
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=os.path.basename(run_dir),
                   save_code=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device(args.device)
    timing = dict(data_loading_s=time.time() - run_start)

    # data: real transitions; [obs, arctanh(action)] windows for the state model (validation split by episodes)
    rng = np.random.default_rng(args.seed)
    val_mask = rng.random(len(episodes)) < args.val_fraction
    if val_mask.all() or not val_mask.any():
        val_mask[:] = False
        val_mask[rng.integers(len(episodes))] = len(episodes) > 1
    real = {k: torch.as_tensor(v, device=device) for k, v in transitions_from_episodes(episodes).items()}
    obs_dim, act_dim = real["obs"].shape[1], real["actions"].shape[1]
    returns = np.array([e["rewards"].sum() for e in episodes])
    stats = dict(obs_mean=real["obs"].mean(0).cpu(), obs_std=real["obs"].std(0).clamp(min=1e-3).cpu(),
                 return_min=float(returns.min()), return_max=float(returns.max()))
    terminal = terminal_fn(dataset.recover_environment())
    print(f"{dataset.spec.dataset_id}: {len(episodes)} episodes, {len(real['obs'])} transitions, obs_dim {obs_dim}, "
          f"act_dim {act_dim}")

    # models: the one-step ensemble (first trajectory, rewards) and the action-conditioned state model; a resumed run
    # takes both from its checkpoint
    t0 = time.time()
    if ckpt is not None:
        ensemble = ProbabilisticEnsemble(obs_dim, act_dim, args.ensemble_size, args.dynamics_hidden, args.dynamics_layers,
                                         args.num_elites).to(device)
        ensemble.load_state_dict(ckpt["ensemble"])
        ensemble_info = ckpt["ensemble_info"]
    else:
        ensemble, ensemble_info = train_ensemble(args, episodes, writer, device)
    timing["ensemble_s"] = time.time() - t0
    t0 = time.time()
    known = state_model_known(args.horizon, obs_dim, act_dim)
    config = {**{k: getattr(args, k) for k in DIFFUSER_FIELDS}, "clean_known_input": args.clean_known_input}
    curve = []
    train_eps = [e for e, v in zip(episodes, val_mask) if not v]
    val_eps = [e for e, v in zip(episodes, val_mask) if v] or train_eps
    val_windows = make_windows(val_eps, args.horizon, args.window_stride)[..., :obs_dim + act_dim]
    if ckpt is not None:
        saved = ckpt["state_model"]
        config, curve = saved["config"], saved["curve"]
        denoiser = build_denoiser(config, obs_dim + act_dim).to(device).requires_grad_(False)
        denoiser.load_state_dict(saved["ema"])
        normalizer = Normalizer(saved["mean"], saved["std"]).to(device)
    elif args.state_model_checkpoint:
        denoiser, normalizer, saved = load_diffuser(args.state_model_checkpoint, device)
        config, curve = saved["config"], saved.get("curve", [])
        if saved["data_dim"] != obs_dim + act_dim or saved.get("kind") != "dydiff_state_model":
            raise SystemExit(f"error: {args.state_model_checkpoint} is not a DyDiff state model of this dataset's "
                             f"{obs_dim} + {act_dim} channels; pass the state_model.pt of a dydiff_td3bc.py run")
    else:
        windows = make_windows(train_eps, args.horizon, args.window_stride)[..., :obs_dim + act_dim]
        denoiser, normalizer, curve = train_diffuser(config, windows, val_windows, writer, device, known,
                                                     compile=args.compile)
        denoiser.requires_grad_(False)
    timing["state_model_s"] = time.time() - t0
    sampler = GuidedEDMSampler(denoiser, normalizer, obs_dim, act_dim,
                               **{**DYDIFF_SAMPLER, "sampler_steps": args.sampler_steps, "compile": args.compile})
    check_windows = torch.as_tensor(val_windows[np.random.default_rng(args.seed).permutation(len(val_windows))[:256]])
    check = state_model_check(sampler, check_windows, torch.Generator().manual_seed(args.seed + 1))
    mse = check["rollout_mse"]
    print(f"state model on {check['windows']} held-out windows (s_0 and their actions given): state MSE step 1 "
          f"{mse[1]:.3g}, step {len(mse) - 1} {mse[-1]:.3g}, mean {np.mean(mse[1:]):.3g} (normalised); step-1 "
          f"denoising MSE by sigma {check['step1_denoise_mse']}")

    torch.manual_seed(args.seed)  # the agent's randomness must not depend on what was trained or loaded
    agent = make_agent(args, act_dim, stats).to(device)
    buffer = RingBuffer(args.buffer_size, obs_dim, act_dim, device)
    gen = torch.Generator().manual_seed(args.seed)
    n_synthetic = args.batch_size - round(args.batch_size * args.real_ratio)
    history, generations, start, first_step, elapsed = [], [], time.time(), 1, 0.0
    timing.update(agent_updates_s=0.0, agent_first_updates_s=0.0, agent_first_updates=0, evaluation_s=0.0)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    state_model = dict(ema=denoiser.state_dict(), mean=normalizer.mean, std=normalizer.std, config=config, curve=curve)
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        load_training_state(agent, ckpt["training_state"])
        buffer.load_state_dict(ckpt["buffer"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        history, generations, first_step, elapsed = ckpt["history"], ckpt["generations"], ckpt["step"] + 1, ckpt["agent_time_s"]
        run_start -= ckpt.get("wall_time_s", 0.0)  # wall_time_s counts the earlier sittings (up to the checkpoint)
        timing.update({k: v for k, v in ckpt["timing"].items() if k != "data_loading_s"})
        print(f"resumed {run_dir} at step {first_step}")
    if args.compile_agent:
        compile_agent(agent, device)

    def save_checkpoint(step: int):
        atomic_torch_save(dict(step=step, agent=agent.state_dict(), training_state=training_state(agent),
                               buffer=buffer.state_dict(), ensemble=ensemble.state_dict(), ensemble_info=ensemble_info,
                               state_model=state_model, generator=gen.get_state(), torch_rng=torch.get_rng_state(),
                               cuda_rng=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                               history=history, generations=generations, agent_time_s=elapsed + time.time() - start,
                               wall_time_s=time.time() - run_start, timing=timing, args=dataclasses.asdict(args)),
                          checkpoint_path)

    # ALGO LOGIC: training loop
    stop["armed"] = True
    bar = tqdm(range(first_step, args.total_steps + 1), desc="agent", mininterval=5, file=sys.stdout,
               initial=first_step - 1, total=args.total_steps)
    for step in bar:
        if n_synthetic > 0 and (step - 1) % args.rollout_every == 0:
            t0 = time.time()
            starts = real["obs"][torch.randint(len(real["obs"]), (args.rollout_batch,), generator=gen).to(device)]
            parts = [dydiff_rollouts(sampler, ensemble, agent.act, starts[b:b + args.sample_batch_size], args.horizon,
                                     args.iterations, gen) for b in range(0, len(starts), args.sample_batch_size)]
            traj = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            new, info = dydiff_transitions(traj, ensemble, terminal, args.keep_fraction)
            buffer.add(new)
            with torch.no_grad():
                info.update(action_log_prob=agent.log_prob(new["obs"], new["actions"]).mean().item(),
                            real_action_log_prob=agent.log_prob(real["obs"], real["actions"]).mean().item())
            info.update(step=step, seconds=time.time() - t0, trajectories=args.rollout_batch, buffer=buffer.size,
                        trajectories_per_s=args.rollout_batch / (time.time() - t0))
            generations.append(info)
            for k in ("transitions", "terminal_rate", "mean_length", "reward_mean", "action_log_prob", "seconds"):
                writer.add_scalar(f"synthetic/{k}", info[k], step)
        t0 = time.time()
        use_synthetic = n_synthetic if buffer.size >= n_synthetic else 0  # all real while the buffer is too small
        idx = torch.randint(len(real["obs"]), (args.batch_size - use_synthetic,), device=device)
        batch = {k: v[idx] for k, v in real.items()}
        if use_synthetic:
            synthetic = buffer.sample(use_synthetic)
            batch = {k: torch.cat([batch[k], synthetic[k]]) for k in batch}
        losses = agent.update(batch)
        seconds = time.time() - t0
        timing["agent_updates_s"] += seconds
        if step < first_step + 2:  # this process's first two updates: the compilation, with --compile-agent
            timing["agent_first_updates_s"] += seconds
            timing["agent_first_updates"] += 1

        # TRY NOT TO MODIFY: logging and evaluation
        checkpoint_now = bool(stop["signals"]) or (args.checkpoint_every and step % args.checkpoint_every == 0
                                                    and step < args.total_steps)
        if step % args.log_every == 0 or checkpoint_now:
            values = {k: v.item() for k, v in losses.items()}
            bad = {k: v for k, v in values.items() if not math.isfinite(v)}
            if bad:  # never checkpoint a diverged agent: the last checkpoint stays the last good one
                raise SystemExit(f"error: agent loss {', '.join(f'{k} = {v}' for k, v in bad.items())} at step {step}; "
                                 f"lower --learning-rate (or check the data's rewards); run marked failed")
            if step % args.log_every == 0:
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
                writer.add_scalar("charts/SPS", int((step - first_step + 1) / (time.time() - start)), step)
        if step % args.eval_every == 0 or step == args.total_steps:
            t0 = time.time()
            returns = evaluate(agent.act, dataset, args.eval_episodes, args.seed + 10_000, device)
            timing["evaluation_s"] += time.time() - t0
            score = normalized_score(dataset, returns)
            probe_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            with torch.no_grad():
                probe = torch.randint(len(real["obs"]), (4096,), generator=probe_gen).to(device)
                values = dict(q_real=agent.q_value(real["obs"][probe], real["actions"][probe]).mean().item())
                if buffer.size:
                    synthetic = buffer.sample(4096)
                    values["q_synthetic"] = agent.q_value(synthetic["obs"], synthetic["actions"]).mean().item()
            history.append(dict(step=step, return_mean=float(returns.mean()), score_mean=float(score.mean()),
                                score_std=float(score.std()), **values))
            writer.add_scalar("eval/normalized_score", score.mean(), step)
            bar.set_postfix(score=f"{score.mean():.1f}")
            print(f"step {step}: return {returns.mean():.1f}, normalized score {score.mean():.1f} +- {score.std():.1f}")
        if checkpoint_now:
            save_checkpoint(step)
        if stop["signals"]:
            writer.close()
            signum = stop["signals"][0]
            print(f"stopped by signal {signum} after step {step}: checkpoint {checkpoint_path}; continue with --resume")
            sys.exit(128 + signum)
    stop["armed"] = False

    best = max(history, key=lambda h: h["score_mean"])
    sampling = sum(g["seconds"] for g in generations)
    later = args.total_steps - timing["agent_first_updates"], timing["agent_updates_s"] - timing["agent_first_updates_s"]
    time_breakdown = dict(**timing, sampling_s=sampling,
                          updates_per_s=later[0] / later[1] if later[0] > 0 else args.total_steps / timing["agent_updates_s"],
                          regenerations=[dict(g, guided=True) for g in generations])
    summary = dict(status="finished", env_id=args.env_id, dataset_id=dataset.spec.dataset_id, exp_name=args.exp_name,
                   seed=args.seed, last_score=history[-1]["score_mean"], best_score=best["score_mean"],
                   best_step=best["step"], agent_time_s=elapsed + time.time() - start,
                   wall_time_s=time.time() - run_start, history=history, ensemble=ensemble_info, state_model_curve=curve,
                   state_model_check=check, resumed_from_step=first_step - 1 if ckpt else None,
                   time_breakdown=time_breakdown, args=dataclasses.asdict(args))
    atomic_json(summary, os.path.join(run_dir, "results.json"))
    if os.path.exists(checkpoint_path):
        os.remove(checkpoint_path)  # results.json is the record now
    if args.save_model:
        atomic_torch_save(agent.state_dict(), os.path.join(run_dir, "agent.pt"))
        atomic_torch_save(agent.policy_checkpoint(), os.path.join(run_dir, "policy.pt"))
        atomic_torch_save(dict(**state_model, data_dim=obs_dim + act_dim, dataset_id=dataset.spec.dataset_id,
                               kind="dydiff_state_model"), os.path.join(run_dir, "state_model.pt"))
    writer.close()
    print(f"time: data {timing['data_loading_s']:.0f}s, ensemble {timing['ensemble_s']:.0f}s, state model "
          f"{timing['state_model_s']:.0f}s, sampling {sampling:.0f}s ({len(generations)} generations), agent updates "
          f"{timing['agent_updates_s']:.0f}s ({time_breakdown['updates_per_s']:.0f} updates/s after the first "
          f"{timing['agent_first_updates']}, {timing['agent_first_updates_s']:.0f}s"
          f"{' with compilation' if args.compile_agent else ''}), evaluation "
          f"{timing['evaluation_s']:.0f}s, wall {summary['wall_time_s']:.0f}s")
    print(f"{args.exp_name} {args.env_id} seed {args.seed}: last score {summary['last_score']:.1f}, "
          f"best {summary['best_score']:.1f} (step {best['step']}) -> {run_dir}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
