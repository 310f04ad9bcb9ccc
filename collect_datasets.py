"""Build real Minari datasets locally, under the usual ids, so every script loads data one way: `minari.load_dataset`.

    python collect_datasets.py --env-id hopper-medium-replay      # any short name of DATASETS below
    python collect_datasets.py --env-id maze2d-umaze --num-steps 100000
    python collect_datasets.py --env-id hopper-medium --info       # print the stats of a dataset already built

MuJoCo (HalfCheetah-v5, Hopper-v5, Walker2d-v5): one SAC behaviour policy per env is trained on CPU (2x256 MLPs,
twin Q, automatic entropy tuning), with a resumable checkpoint in `--work-dir/<env>/`. Training stops at the
*medium point* (first evaluation whose deterministic return reaches the env's medium target, or `--medium-max-steps`,
whichever comes first), then goes on to the *expert point* (expert target or `--expert-max-steps`). Levels:
  random         uniform random actions
  medium         rollouts of the medium SAC actor (stochastic: tanh of a Gaussian sample, like D4RL)
  medium-replay  the SAC replay buffer from step 0 to the medium point, episodes in the order they were collected
  expert         rollouts of the expert SAC actor
  medium-expert  the episodes of `medium` followed by those of `expert` (both are built first if missing)
The SAC run is shared by all levels of an env: the medium point (actor + replay buffer) is cached in the work dir, so
`medium` and `medium-replay` train once. Rollout datasets hold `--num-steps` transitions (default 1M, like D4RL);
the episode running when that count is reached ends truncated.

Maze2d (PointMaze_{UMaze,Medium,Large}-v3 of gymnasium-robotics, D4RL style): a waypoint controller (breadth-first
search over the free maze cells towards the goal cell, then a PD controller on position/velocity towards the next
cell centre, or the goal itself in the goal cell) drives the point; the env runs as a continuing task, so each
reached goal is replaced by a random goal in another cell (the collector sets it; PointMaze v3's own
continuing mode keeps the goal); episodes are `--maze-episode-len` steps long. No training.

Every dataset carries D4RL's `ref_min_score`/`ref_max_score`, an `eval_env` (MuJoCo: the same v5 env; maze: the
v3 maze with a fixed goal and D4RL's horizon), `algorithm_name`, and in `description` a JSON with the collector's
exact Args and the behaviour policy's evaluation return. A dataset is written under a hidden temporary root inside
the Minari store and renamed into place when complete: an interrupted run leaves no dataset under the real id.

Behaviour policy checkpoints: `--policy-dir/{env}-{medium,expert}.pt`, a dict saved with `torch.save`:
    {"kind": "sac_tanh_gaussian", "obs_dim": int, "act_dim": int, "hidden": [256, 256],
     "state_dict": <Actor.state_dict()>, "return": <mean deterministic eval return when it was cut>, "step": int}
Actor (rebuild it with the `Actor` class below, or by hand): trunk = Linear(obs_dim, 256), ReLU, Linear(256, 256),
ReLU (state_dict keys `trunk.0.*`, `trunk.2.*`); heads `mean` = Linear(256, act_dim), `log_std` = Linear(256, act_dim),
log_std clamped to [-5, 2]; action = tanh(mean + exp(log_std) * N(0, I)) (deterministic: tanh(mean)). The env
action bounds are [-1, 1] for the three MuJoCo envs, so no rescaling.
"""
import dataclasses
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    env_id: str = "hopper-medium-replay"
    """dataset name (a key of DATASETS): built here (`halfcheetah-medium`, `maze2d-umaze`) or imported from D4RL's
    own file (`hopper-medium-replay-v2`, `maze2d-umaze-v1`)"""
    num_steps: Optional[int] = None
    """transitions in rollout datasets (random, medium, expert, maze2d); default 1M. medium-replay is the replay buffer"""
    overwrite: bool = False
    """replace a dataset that already exists under the same Minari id"""
    info: bool = False
    """only print the stats (episodes, steps, mean return, mean normalized return) of the already built dataset"""
    seed: int = 0
    """seed of the SAC run, the rollouts and the environments"""
    work_dir: str = "checkpoints/collect"
    """where the resumable SAC state and the cached medium/expert points live (one subfolder per env)"""
    resume: bool = True
    """continue the SAC run saved in the work dir instead of starting over"""
    policy_dir: str = "policies"
    """where the behaviour policies are saved as `{env}-{medium,expert}.pt`"""
    medium_target: Optional[float] = None
    """eval return that ends the medium stage (default: SAC_ENVS table, e.g. hopper 1100)"""
    expert_target: Optional[float] = None
    """eval return that ends the expert stage (default: SAC_ENVS table, e.g. hopper 3000)"""
    medium_max_steps: int = 300_000
    """SAC env steps at which the medium stage is cut even if its target was not reached"""
    expert_max_steps: int = 1_000_000
    """SAC env steps at which the expert stage is cut even if its target was not reached"""
    learning_starts: int = 5_000
    """SAC steps of uniform random actions before updates begin"""
    batch_size: int = 256
    """SAC minibatch size"""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target critics"""
    eval_freq: int = 5_000
    """SAC steps between evaluations (deterministic policy)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    checkpoint_freq: int = 10_000
    """SAC steps between atomic checkpoints of the whole run (nets, optimizers, replay buffer, step, RNG)"""
    log_freq: int = 5_000
    """steps between progress lines"""
    deterministic_rollouts: bool = False
    """collect medium/expert with tanh(mean) instead of sampled actions"""
    maze_episode_len: int = 1_000
    """length of the (continuing, multi-goal) maze2d episodes"""
    torch_threads: int = 1
    """torch CPU threads"""
    d4rl_file: Optional[str] = None
    """D4RL names (`hopper-medium-replay-v2`): the hdf5 file to import (default: D4RL's file name in
    $D4RL_DATASET_DIR, else ~/.d4rl/datasets/, where the `d4rl` package keeps its downloads)"""
    download: bool = False
    """D4RL names: fetch the hdf5 file from `--d4rl-base-url` into $D4RL_DATASET_DIR or ~/.d4rl/datasets/ when it is
    not there (resumable: a `.part` file is continued)"""
    d4rl_base_url: str = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
    """where D4RL publishes its files (`<base>/gym_mujoco_v2/hopper_medium_replay-v2.hdf5`); point it at a mirror"""


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


# Per-env SAC set-up. Medium targets follow D4RL's "about 1/3 of expert" rule; ref scores are D4RL's.
SAC_ENVS = {
    "halfcheetah": dict(gym_id="HalfCheetah-v5", medium_target=4000.0, expert_target=10000.0,
                        ref_min_score=-280.178953, ref_max_score=12135.0),
    "hopper": dict(gym_id="Hopper-v5", medium_target=1100.0, expert_target=3000.0,
                   ref_min_score=-20.272305, ref_max_score=3234.3),
    "walker2d": dict(gym_id="Walker2d-v5", medium_target=1500.0, expert_target=4000.0,
                     ref_min_score=1.629008, ref_max_score=4592.3),
}
# Maze2d: gymnasium-robotics env, D4RL evaluation horizon, D4RL ref scores.
MAZES = {
    "umaze": dict(gym_id="PointMaze_UMaze-v3", eval_steps=300, ref_min_score=23.85, ref_max_score=161.86),
    "medium": dict(gym_id="PointMaze_Medium-v3", eval_steps=600, ref_min_score=13.13, ref_max_score=277.39),
    "large": dict(gym_id="PointMaze_Large-v3", eval_steps=800, ref_min_score=6.7, ref_max_score=273.99),
}
DEFAULT_NUM_STEPS = 1_000_000
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def log(msg: str):
    print(f"[collect {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------- SAC
class Actor(nn.Module):
    """obs -> 256 -> 256 -> (mean, log_std); action = tanh(Gaussian sample)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden=(256, 256)):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU())
        self.mean = nn.Linear(hidden[1], act_dim)
        self.log_std = nn.Linear(hidden[1], act_dim)

    def forward(self, obs):
        h = self.trunk(obs)
        return self.mean(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs):
        mean, log_std = self(obs)
        std = log_std.exp()
        u = mean + std * torch.randn_like(mean)
        a = torch.tanh(u)
        logp = (-0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)
        logp = logp - (2 * (np.log(2) - u - F.softplus(-2 * u))).sum(-1)  # tanh change of variables
        return a, logp


class Critic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden=(256, 256)):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]),
                                 nn.ReLU(), nn.Linear(hidden[1], 1))

    def forward(self, obs, act):
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


class NumpyActor:
    """Fast single-observation forward pass of an Actor state_dict (rollouts are CPU-bound on tiny matmuls)."""

    def __init__(self, state_dict: dict, rng: np.random.Generator, deterministic: bool):
        p = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in state_dict.items()}
        self.layers = [(p["trunk.0.weight"].T, p["trunk.0.bias"]), (p["trunk.2.weight"].T, p["trunk.2.bias"])]
        self.mean = (p["mean.weight"].T, p["mean.bias"])
        self.log_std = (p["log_std.weight"].T, p["log_std.bias"])
        self.rng, self.deterministic = rng, deterministic

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = np.asarray(obs, np.float64)
        for w, b in self.layers:
            h = np.maximum(h @ w + b, 0.0)
        mean = h @ self.mean[0] + self.mean[1]
        if self.deterministic:
            return np.tanh(mean)
        log_std = np.clip(h @ self.log_std[0] + self.log_std[1], LOG_STD_MIN, LOG_STD_MAX)
        return np.tanh(mean + np.exp(log_std) * self.rng.standard_normal(mean.shape))


def policy_file(args: Args, env_name: str, level: str) -> str:
    return os.path.join(args.policy_dir, f"{env_name}-{level}.pt")


def save_policy(path: str, actor_sd: dict, obs_dim: int, act_dim: int, ret: float, step: int):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_torch_save({"kind": "sac_tanh_gaussian", "obs_dim": obs_dim, "act_dim": act_dim, "hidden": [256, 256],
                       "state_dict": {k: v.detach().cpu().clone() for k, v in actor_sd.items()},
                       "return": float(ret), "step": int(step)}, path)


def atomic_torch_save(obj, path: str):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(env: gym.Env, actor_sd: dict, episodes: int, seed: int) -> float:
    policy = NumpyActor(actor_sd, np.random.default_rng(seed), deterministic=True)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(policy(obs))
            ret += float(r)
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns))


def sac_paths(args: Args, env_name: str) -> dict:
    d = os.path.join(args.work_dir, env_name)
    return dict(dir=d, state=os.path.join(d, "sac_state.pt"), medium=os.path.join(d, "medium_point.pt"),
                expert=os.path.join(d, "expert_point.pt"))


def train_sac(args: Args, env_name: str, until: str) -> dict:
    """Run (or resume) the env's SAC run until the `until` point ("medium" or "expert"); return that point's cache:
    {"actor": state_dict, "return", "step", "cut": "target"|"step cap", "target", "obs_dim", "act_dim",
     "replay": {obs, actions, rewards, next_obs, terminations, truncations} (medium point only)}."""
    cfg, paths = SAC_ENVS[env_name], sac_paths(args, env_name)
    if os.path.exists(paths[until]):
        point = torch.load(paths[until], weights_only=False)
        log(f"{env_name}: using the cached {until} point ({paths[until]}: return {point['return']:.1f} "
            f"at SAC step {point['step']})")
        return point
    medium_target = args.medium_target if args.medium_target is not None else cfg["medium_target"]
    expert_target = args.expert_target if args.expert_target is not None else cfg["expert_target"]
    os.makedirs(paths["dir"], exist_ok=True)
    torch.set_num_threads(args.torch_threads)
    env, eval_env = gym.make(cfg["gym_id"]), gym.make(cfg["gym_id"])
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    assert np.allclose(env.action_space.low, -1) and np.allclose(env.action_space.high, 1)
    cap = max(args.expert_max_steps, args.medium_max_steps)

    actor, q1, q2 = Actor(obs_dim, act_dim), Critic(obs_dim, act_dim), Critic(obs_dim, act_dim)
    q1_t, q2_t = Critic(obs_dim, act_dim), Critic(obs_dim, act_dim)
    q1_t.load_state_dict(q1.state_dict()), q2_t.load_state_dict(q2.state_dict())
    log_alpha = torch.zeros((), requires_grad=True)
    actor_opt = torch.optim.Adam(actor.parameters(), lr=args.lr)
    q_opt = torch.optim.Adam(list(q1.parameters()) + list(q2.parameters()), lr=args.lr)
    alpha_opt = torch.optim.Adam([log_alpha], lr=args.lr)
    target_entropy = -float(act_dim)
    buf = dict(obs=np.zeros((cap, obs_dim), np.float32), actions=np.zeros((cap, act_dim), np.float32),
               rewards=np.zeros(cap, np.float32), next_obs=np.zeros((cap, obs_dim), np.float32),
               terminations=np.zeros(cap, bool), truncations=np.zeros(cap, bool))
    step, evals, episode_returns = 0, [], deque(maxlen=20)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    medium_done = os.path.exists(paths["medium"])

    if args.resume and os.path.exists(paths["state"]):
        s = torch.load(paths["state"], weights_only=False)
        for m, k in ((actor, "actor"), (q1, "q1"), (q2, "q2"), (q1_t, "q1_t"), (q2_t, "q2_t"), (actor_opt, "actor_opt"),
                     (q_opt, "q_opt"), (alpha_opt, "alpha_opt")):
            m.load_state_dict(s[k])
        with torch.no_grad():
            log_alpha.copy_(s["log_alpha"])
        step, evals = s["step"], s["evals"]
        for k in buf:
            buf[k][:step] = s["buffer"][k]
        rng.bit_generator.state = s["np_rng"]
        torch.set_rng_state(s["torch_rng"])
        if step > 0 and not (buf["terminations"][step - 1] or buf["truncations"][step - 1]):
            buf["truncations"][step - 1] = True  # the env state is not saved: the episode in progress ends here
        log(f"{env_name}: resumed the SAC run at step {step} from {paths['state']}")
    elif os.path.exists(paths["state"]):
        log(f"{env_name}: --no-resume: starting the SAC run over (old state {paths['state']} will be replaced)")
        medium_done = False
        for p in (paths["medium"], paths["expert"]):
            if os.path.exists(p):
                os.remove(p)

    def checkpoint():
        atomic_torch_save(dict(actor=actor.state_dict(), q1=q1.state_dict(), q2=q2.state_dict(), q1_t=q1_t.state_dict(),
                               q2_t=q2_t.state_dict(), actor_opt=actor_opt.state_dict(), q_opt=q_opt.state_dict(),
                               alpha_opt=alpha_opt.state_dict(), log_alpha=log_alpha.detach().clone(), step=step,
                               evals=evals, buffer={k: v[:step].copy() for k, v in buf.items()},
                               np_rng=rng.bit_generator.state, torch_rng=torch.get_rng_state(),
                               args=dataclasses.asdict(args)), paths["state"])

    def make_point(stage: str, ret: float, cut: str, target: float) -> dict:
        point = dict(actor={k: v.detach().clone() for k, v in actor.state_dict().items()}, obs_dim=obs_dim,
                     act_dim=act_dim, step=step, cut=cut, target=target, evals=list(evals), **{"return": ret})
        if stage == "medium":
            point["replay"] = {k: v[:step].copy() for k, v in buf.items()}
            if step > 0 and not (buf["terminations"][step - 1] or buf["truncations"][step - 1]):
                point["replay"]["truncations"][step - 1] = True  # episode in progress at the cut ends truncated
        atomic_torch_save(point, paths[stage])
        save_policy(policy_file(args, env_name, stage), point["actor"], obs_dim, act_dim, ret, step)
        log(f"{env_name}: {stage} point at SAC step {step}: eval return {ret:.1f} (cut by {cut}; target {target})")
        return point

    obs, _ = env.reset(seed=args.seed + step)
    ep_ret, t0, t_step0, point = 0.0, time.time(), step, None
    stage = "expert" if medium_done else "medium"
    for cut_stage, cut_step, target in (("medium", args.medium_max_steps, medium_target), ("expert", cap, expert_target)):
        if point is None and stage == cut_stage and step >= cut_step:  # resumed past a (lowered) step cap: cut now
            ret = evaluate(eval_env, actor.state_dict(), args.eval_episodes, seed=10_000 + step)
            evals.append((step, ret))
            made = make_point(cut_stage, ret, "step cap", target)
            stage = "expert"
            if until == cut_stage:
                point = made
    while point is None:
        if step < args.learning_starts:
            action = rng.uniform(-1, 1, act_dim).astype(np.float32)
        else:
            with torch.no_grad():
                action = actor.sample(torch.as_tensor(obs, dtype=torch.float32)[None])[0][0].numpy()
        next_obs, r, term, trunc, _ = env.step(action)
        buf["obs"][step], buf["actions"][step], buf["rewards"][step] = obs, action, r
        buf["next_obs"][step], buf["terminations"][step], buf["truncations"][step] = next_obs, term, trunc
        step += 1
        ep_ret += float(r)
        obs = next_obs
        if term or trunc:
            episode_returns.append(ep_ret)
            obs, _ = env.reset(seed=args.seed + step)
            ep_ret = 0.0

        if step >= args.learning_starts:
            idx = torch.as_tensor(rng.integers(0, step, args.batch_size))
            b = {k: torch.as_tensor(v[idx.numpy()]) for k, v in buf.items() if k != "truncations"}
            alpha = log_alpha.exp().detach()
            with torch.no_grad():
                na, nlogp = actor.sample(b["next_obs"])
                q_next = torch.min(q1_t(b["next_obs"], na), q2_t(b["next_obs"], na)) - alpha * nlogp
                y = b["rewards"] + args.gamma * (1.0 - b["terminations"].float()) * q_next
            q_loss = F.mse_loss(q1(b["obs"], b["actions"]), y) + F.mse_loss(q2(b["obs"], b["actions"]), y)
            q_opt.zero_grad(set_to_none=True)
            q_loss.backward()
            q_opt.step()
            a, logp = actor.sample(b["obs"])
            actor_loss = (alpha * logp - torch.min(q1(b["obs"], a), q2(b["obs"], a))).mean()
            actor_opt.zero_grad(set_to_none=True)
            actor_loss.backward()
            actor_opt.step()
            alpha_loss = -(log_alpha * (logp.detach() + target_entropy)).mean()
            alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            alpha_opt.step()
            with torch.no_grad():
                for net, tgt in ((q1, q1_t), (q2, q2_t)):
                    for p, pt in zip(net.parameters(), tgt.parameters()):
                        pt.lerp_(p, args.tau)

        if (step % args.eval_freq == 0 and step >= args.learning_starts) or step in (args.medium_max_steps, cap):
            ret = evaluate(eval_env, actor.state_dict(), args.eval_episodes, seed=10_000 + step)
            evals.append((step, ret))
            log(f"{env_name}: eval at step {step}: return {ret:.1f} (stage {stage})")
            if stage == "medium" and (ret >= medium_target or step >= args.medium_max_steps):
                mpoint = make_point("medium", ret, "target" if ret >= medium_target else "step cap", medium_target)
                stage = "expert"
                if until == "medium":
                    point = mpoint
            if point is None and stage == "expert" and (ret >= expert_target or step >= cap):
                point = make_point("expert", ret, "target" if ret >= expert_target else "step cap", expert_target)
        if step % args.log_freq == 0:
            sps = (step - t_step0) / max(time.time() - t0, 1e-9)
            last = f"{evals[-1][1]:.1f}" if evals else "n/a"
            recent = f"{np.mean(episode_returns):.1f}" if episode_returns else "n/a"
            log(f"{env_name}: SAC step {step}/{args.medium_max_steps if stage == 'medium' else cap} ({stage}) "
                f"train return {recent} last eval {last} alpha {log_alpha.exp().item():.3f} SPS {sps:.0f} "
                f"ETA to cap {((args.medium_max_steps if stage == 'medium' else cap) - step) / max(sps, 1e-9) / 60:.1f} min")
        if step % args.checkpoint_freq == 0 or point is not None:
            checkpoint()
    return point


# ---------------------------------------------------------------------------------------------------- rollouts
def rollouts(env: gym.Env, policy, num_steps: int, seed: int, rng: np.random.Generator, what: str):
    """`num_steps` transitions of `policy` (None: uniform random) as a list of EpisodeBuffer; returns of complete
    episodes. The episode running at the end is cut (truncated)."""
    from minari.data_collector import EpisodeBuffer
    episodes, returns, t0 = [], [], time.time()
    low, high = env.action_space.low, env.action_space.high
    total = 0
    while total < num_steps:
        obs, _ = env.reset(seed=seed + len(episodes))
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = rng.uniform(low, high) if policy is None else policy(obs)
            act = np.asarray(act, np.float32)
            obs, rew, term, trunc, _ = env.step(act)
            total += 1
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
            if total >= num_steps and not (term or trunc):
                trunc = tr[-1] = True
            if term or trunc:
                break
            if total % 100_000 == 0:
                sps = total / (time.time() - t0)
                log(f"{what}: {total}/{num_steps} steps, SPS {sps:.0f}, ETA {(num_steps - total) / sps / 60:.1f} min")
        if not te[-1] and not tr[-1]:
            raise AssertionError("episode ended without termination or truncation")
        if not tr[-1] or len(r) == env.spec.max_episode_steps:
            returns.append(float(np.sum(r)))
        episodes.append(EpisodeBuffer(id=len(episodes), observations=np.asarray(o, np.float32),
                                      actions=np.asarray(a, np.float32), rewards=np.asarray(r, np.float64),
                                      terminations=np.asarray(te, bool), truncations=np.asarray(tr, bool)))
    log(f"{what}: {total} steps in {len(episodes)} episodes, {time.time() - t0:.0f} s")
    return episodes, returns


def replay_episodes(replay: dict):
    """Split a SAC replay buffer (flat transitions in collection order) into EpisodeBuffers."""
    from minari.data_collector import EpisodeBuffer
    ends = np.flatnonzero(replay["terminations"] | replay["truncations"])
    episodes, start = [], 0
    for end in ends:
        sl = slice(start, end + 1)
        obs = np.concatenate([replay["obs"][sl], replay["next_obs"][end:end + 1]]).astype(np.float32)
        episodes.append(EpisodeBuffer(id=len(episodes), observations=obs, actions=replay["actions"][sl],
                                      rewards=replay["rewards"][sl].astype(np.float64),
                                      terminations=replay["terminations"][sl].copy(),
                                      truncations=replay["truncations"][sl].copy()))
        start = end + 1
    return episodes


def episodes_of(dataset):
    """The EpisodeBuffers of a stored Minari dataset (for medium-expert)."""
    from minari.data_collector import EpisodeBuffer
    return [EpisodeBuffer(observations=ep.observations, actions=ep.actions, rewards=ep.rewards,
                          terminations=ep.terminations, truncations=ep.truncations)
            for ep in dataset.iterate_episodes()]


# -------------------------------------------------------------------------------------------------------- maze2d
def register_mazes():
    """gymnasium-robotics' PointMaze envs, without the notice about its Adroit envs that its import prints."""
    import contextlib
    import io
    with contextlib.redirect_stderr(io.StringIO()):
        import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)


class WaypointController:
    """BFS over the free cells of the maze towards the goal cell; PD control towards the next cell centre."""

    def __init__(self, maze, kp: float = 10.0, kd: float = -1.0):
        self.maze, self.kp, self.kd = maze, kp, kd
        self.free = np.array([[c != 1 for c in row] for row in maze.maze_map])
        self._goal_cell, self._dist = None, None

    def _bfs(self, goal_cell):
        dist = np.full(self.free.shape, np.inf)
        dist[goal_cell] = 0
        frontier = deque([goal_cell])
        while frontier:
            i, j = frontier.popleft()
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                n = (i + di, j + dj)
                if 0 <= n[0] < dist.shape[0] and 0 <= n[1] < dist.shape[1] and self.free[n] and dist[n] == np.inf:
                    dist[n] = dist[i, j] + 1
                    frontier.append(n)
        return dist

    def __call__(self, obs: dict) -> np.ndarray:
        pos, vel, goal = obs["observation"][:2], obs["observation"][2:4], obs["desired_goal"]
        goal_cell = tuple(int(v) for v in self.maze.cell_xy_to_rowcol(goal))
        if goal_cell != self._goal_cell:
            self._goal_cell, self._dist = goal_cell, self._bfs(goal_cell)
        cell = tuple(int(v) for v in self.maze.cell_xy_to_rowcol(pos))
        target = goal
        if cell != goal_cell and self._dist[cell] < np.inf:
            best = min(((cell[0] + di, cell[1] + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))),
                       key=lambda n: self._dist[n] if 0 <= n[0] < self._dist.shape[0]
                       and 0 <= n[1] < self._dist.shape[1] else np.inf)
            target = self.maze.cell_rowcol_to_xy(np.array(best))
        return np.clip(self.kp * (target - pos) + self.kd * vel, -1.0, 1.0).astype(np.float32)


def maze_rollouts(args: Args, maze: str, num_steps: int):
    from minari.data_collector import EpisodeBuffer
    register_mazes()
    cfg = MAZES[maze]
    env = gym.make(cfg["gym_id"], continuing_task=True, reset_target=False, max_episode_steps=args.maze_episode_len)
    controller = WaypointController(env.unwrapped.maze)
    episodes, goals, total, t0 = [], 0, 0, time.time()
    while total < num_steps:
        obs, _ = env.reset(seed=args.seed + len(episodes))
        o, a, r, te, tr, succ = [obs], [], [], [], [], [False]
        while True:
            act = controller(obs)
            obs, rew, term, trunc, info = env.step(act)
            total += 1
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
            succ.append(bool(info["success"]))
            if info["success"]:  # D4RL style: a reached goal is replaced by a random goal in another cell
                u = env.unwrapped
                while np.linalg.norm((goal := u.generate_target_goal()) - obs["achieved_goal"]) < u.maze.maze_size_scaling:
                    pass
                u.goal = u.add_xy_position_noise(goal)
                u.update_target_site_pos()
                obs["desired_goal"] = u.goal.copy()  # the stored observation shows the goal the next step is scored on
            if total >= num_steps and not (term or trunc):
                trunc = tr[-1] = True
            if term or trunc:
                break
        goals += int(np.sum(np.diff(np.asarray(succ, int)) == 1))
        episodes.append(EpisodeBuffer(id=len(episodes), observations={k: np.asarray([x[k] for x in o], np.float64)
                                                                      for k in o[0]},
                                      actions=np.asarray(a, np.float32), rewards=np.asarray(r, np.float64),
                                      terminations=np.asarray(te, bool), truncations=np.asarray(tr, bool),
                                      infos={"success": np.asarray(succ, bool)}))
    log(f"maze2d-{maze}: {total} steps, {len(episodes)} episodes, {goals} goals reached, {time.time() - t0:.0f} s")
    return env, episodes, goals


# --------------------------------------------------------------------------------------------------- D4RL import
# D4RL's maze2d files: goal cell (row, col) of each maze (the `G` of D4RL's maze strings; D4RL's layouts are
# gymnasium-robotics' U_MAZE/MEDIUM_MAZE/LARGE_MAZE cell for cell).
D4RL_MAZE_GOAL = {"umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}
D4RL_PARTICLE_OFFSET = 0.2  # D4RL's particle body sits at (1.2, 1.2), its walls at (row + 1, col + 1)


def d4rl_source(name: str) -> dict:
    """D4RL's file name and its path under D4RL's base URL for a D4RL dataset name."""
    if name.startswith("maze2d-"):
        file = f"{name[:-len('-v1')]}-sparse-v1.hdf5"  # maze2d-umaze-v1 -> maze2d-umaze-sparse-v1.hdf5
        return dict(file=file, path=f"maze2d/{file}")
    env_name, level = name[:-len("-v2")].split("-", 1)
    file = f"{env_name}_{level.replace('-', '_')}-v2.hdf5"  # hopper-medium-replay-v2 -> hopper_medium_replay-v2.hdf5
    return dict(file=file, path=f"gym_mujoco_v2/{file}")


def d4rl_dirs() -> list[str]:
    """Where D4RL's files are looked for, in order: $D4RL_DATASET_DIR (the `d4rl` package's own setting), then
    ~/.d4rl/datasets. Downloads go to the first."""
    dirs = [os.environ.get("D4RL_DATASET_DIR", ""), os.path.expanduser("~/.d4rl/datasets")]
    return list(dict.fromkeys(d for d in dirs if d))


def read_d4rl_file(path: str, obs_dim: int, act_dim: int, maze: bool) -> dict:
    """The arrays of a D4RL hdf5 file, checked (keys, shapes, lengths, finite values); one line when it is not one."""
    import h5py
    need = ["observations", "actions", "rewards", "terminals"] + (["infos/goal"] if maze else [])
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in need if k not in f]
            if missing:
                raise SystemExit(f"error: {path} is not a D4RL dataset file for this name (no {', '.join(missing)}); "
                                 f"check the file or download it again")
            data = {k: np.asarray(f[k][()]) for k in need + ["timeouts", "next_observations"] if k in f}
    except (OSError, KeyError, ValueError) as e:
        raise SystemExit(f"error: cannot read {path} as a D4RL hdf5 file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); delete it and get it again") from None
    n = len(data["observations"])
    shapes = dict(observations=(n, obs_dim), actions=(n, act_dim), next_observations=(n, obs_dim),
                  **{"infos/goal": (n, 2)})
    for k in ("rewards", "terminals", "timeouts"):
        if k in data:
            data[k] = data[k][:, 0] if data[k].ndim == 2 and data[k].shape[1] == 1 else data[k]  # (n, 1) -> (n,)
            shapes[k] = (n,)
    for k, shape in shapes.items():
        if k in data and data[k].shape != shape:
            raise SystemExit(f"error: {path}: {k} has shape {data[k].shape}, expected {shape}; is it the file of "
                             f"this dataset?")
    if n == 0:
        raise SystemExit(f"error: {path} holds no transitions; get the file again")
    for k, v in data.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise SystemExit(f"error: {path}: {k} has NaN/inf values; get the file again")
    data["terminals"] = data["terminals"].astype(bool)
    data["timeouts"] = data.get("timeouts", np.zeros(n, bool)).astype(bool)
    return data


def d4rl_segments(terminals: np.ndarray, timeouts: np.ndarray) -> list[tuple[int, int, str]]:
    """(first row, last row, how it ends) of each episode, split as D4RL users do: on `terminals` or `timeouts`; rows
    after the last flag form a trailing partial episode ("partial")."""
    ends = list(np.flatnonzero(terminals | timeouts))
    if not ends or ends[-1] != len(terminals) - 1:
        ends.append(len(terminals) - 1)
    segments, start = [], 0
    for end in ends:
        segments.append((start, int(end), "terminal" if terminals[end] else "timeout" if timeouts[end] else "partial"))
        start = int(end) + 1
    return segments


def d4rl_maze_to_gym(maze: str, xy: np.ndarray, velocity: bool = False) -> np.ndarray:
    """D4RL maze2d coordinates (x along the maze rows, y along the columns, offset by the particle's body position)
    -> gymnasium-robotics PointMaze coordinates (x along the columns, y up the rows, origin at the maze centre).
    A rotation plus a shift, so distances (rewards, goal checks) and the point-mass dynamics are unchanged; for
    velocities and forces (`velocity=True`) only the rotation applies."""
    if velocity:
        return np.stack([xy[..., 1], -xy[..., 0]], -1)
    grid = maze_grid(maze)
    rows, cols = len(grid), len(grid[0])
    row, col = xy[..., 0] + D4RL_PARTICLE_OFFSET, xy[..., 1] + D4RL_PARTICLE_OFFSET
    return np.stack([col + 0.5 - cols / 2, rows / 2 - row - 0.5], -1)


def maze_grid(maze: str) -> list:
    """gymnasium-robotics' cell map of a maze (a copy: 1 wall, 0 free)."""
    from gymnasium_robotics.envs.maze import maps
    return [list(r) for r in {"umaze": maps.U_MAZE, "medium": maps.MEDIUM_MAZE, "large": maps.LARGE_MAZE}[maze]]


def d4rl_maze_map(maze: str) -> list:
    """gymnasium-robotics' map of the maze with D4RL's goal cell marked, so the eval env's goal is D4RL's."""
    from gymnasium_robotics.envs.maze import maps
    grid = maze_grid(maze)
    i, j = D4RL_MAZE_GOAL[maze]
    grid[i][j] = maps.GOAL
    return grid


def d4rl_episodes(data: dict, maze: Optional[str] = None):
    """EpisodeBuffers of a D4RL file's arrays, and what the split did. `next_observations`, when the file has them,
    give each episode's last successor; otherwise the next row does, and an episode cut by a timeout (or the end of
    the file) loses its last transition, whose successor is unknown (as in `d4rl.qlearning_dataset`). Maze2d rows
    become PointMaze's dict observations (achieved_goal, desired_goal = `infos/goal`, observation), in PointMaze's
    frame."""
    from minari.data_collector import EpisodeBuffer
    obs, nxt, n = data["observations"], data.get("next_observations"), len(data["observations"])
    actions = data["actions"].astype(np.float32)
    if maze is not None:
        goal = d4rl_maze_to_gym(maze, data["infos/goal"].astype(np.float64))
        actions = d4rl_maze_to_gym(maze, actions, velocity=True).astype(np.float32)

    def rows_to_obs(raw: np.ndarray, goals: np.ndarray):
        if maze is None:
            return raw.astype(np.float32)
        pos = d4rl_maze_to_gym(maze, raw[:, :2].astype(np.float64))
        vel = d4rl_maze_to_gym(maze, raw[:, 2:4].astype(np.float64), velocity=True)
        return {"achieved_goal": pos, "desired_goal": goals, "observation": np.concatenate([pos, vel], 1)}

    episodes, dropped, mismatched = [], 0, 0
    segments = d4rl_segments(data["terminals"], data["timeouts"])
    for start, end, how in segments:
        last = end  # last transition kept
        if nxt is not None:
            successor = nxt[end]
            mismatched += int((~np.isclose(nxt[start:end], obs[start + 1:end + 1], atol=1e-5)).any(-1).sum())
        elif how == "terminal":  # the successor of a terminal transition is never used; D4RL takes the next row
            successor = obs[min(end + 1, n - 1)]
        else:
            last, successor = end - 1, obs[end]
            if last < start:
                dropped += 1
                continue
        raw = np.concatenate([obs[start:last + 1], successor[None]])
        goals = None if maze is None else np.concatenate([goal[start:last + 1], goal[min(last + 1, n - 1)][None]])
        T = last - start + 1
        terminations, truncations = np.zeros(T, bool), np.zeros(T, bool)
        terminations[-1], truncations[-1] = how == "terminal", how != "terminal"
        episodes.append(EpisodeBuffer(id=len(episodes), observations=rows_to_obs(raw, goals),
                                      actions=actions[start:last + 1], rewards=data["rewards"][start:last + 1]
                                      .astype(np.float64), terminations=terminations, truncations=truncations))
    kinds = [how for _, _, how in segments]
    info = dict(rows=n, episodes=len(episodes), terminal_episodes=kinds.count("terminal"),
                timeout_episodes=kinds.count("timeout"), trailing_partial_episode=kinds[-1] == "partial",
                dropped_one_row_episodes=dropped, next_observations_in_file=nxt is not None,
                next_observation_mismatches=mismatched)
    return episodes, info


def download_d4rl(url: str, dest: str) -> str:
    """Fetch `url` to `dest` through `dest.part` (continued with an HTTP Range request when a previous try left one),
    with a progress bar; the file is renamed into place only when complete and readable as hdf5."""
    import urllib.error
    import urllib.request
    from tqdm import tqdm
    part = dest + ".part"
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        have = os.path.getsize(part) if os.path.exists(part) else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            response = urllib.request.urlopen(request, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:  # 416: the range starts at the end: the .part file is already complete
                raise
            response = None
        total = None
        if response is not None:
            with response:
                if have and response.getcode() != 206:  # the server (or a file:// URL) ignored the range: start over
                    have = 0
                size = response.headers.get("Content-Length")
                total = int(size) + have if size is not None else None
                log(f"downloading {url} -> {dest}")
                with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B",
                                                                  unit_scale=True, desc=os.path.basename(dest)) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise SystemExit(f"error: downloading {url} failed (HTTP {e.code} {e.reason}); check --d4rl-base-url, or get "
                         f"the file by hand and pass --d4rl-file PATH") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = str(getattr(e, "reason", None) or e).splitlines() or [""]
        raise SystemExit(f"error: downloading {url} failed ({type(e).__name__}: {reason[0]}); run the same command "
                         f"again to continue, or get the file by hand and pass --d4rl-file PATH") from None
    if total is not None and os.path.getsize(part) != total:
        raise SystemExit(f"error: the download of {url} stopped at {os.path.getsize(part)} of {total} bytes; run the "
                         f"same command again to continue ({part} is kept)")
    import h5py
    try:
        with h5py.File(part, "r") as f:
            if "observations" not in f:
                raise OSError("no `observations` dataset")
    except OSError as e:
        os.remove(part)
        raise SystemExit(f"error: what {url} sent is not a D4RL hdf5 file ({e}); it was deleted; check "
                         f"--d4rl-base-url") from None
    os.replace(part, dest)
    return dest


def find_d4rl_file(args: Args, name: str) -> str:
    """--d4rl-file, else D4RL's file name in $D4RL_DATASET_DIR or ~/.d4rl/datasets, else --download; otherwise one
    line naming the file and the three ways to provide it."""
    source = d4rl_source(name)
    if args.d4rl_file is not None:
        if not os.path.isfile(args.d4rl_file):
            raise SystemExit(f"error: --d4rl-file {args.d4rl_file} does not exist")
        return args.d4rl_file
    looked = [os.path.join(d, source["file"]) for d in d4rl_dirs()]
    for path in looked:
        if os.path.isfile(path):
            return path
    url = f"{args.d4rl_base_url.rstrip('/')}/{source['path']}"
    if args.download:
        return download_d4rl(url, looked[0])
    raise SystemExit(f"error: D4RL file {source['file']} not found (looked for {' and '.join(looked)}); put it there, "
                     f"or pass --d4rl-file PATH, or add --download to fetch it from {url}")


def import_d4rl(args: Args, name: str) -> dict:
    """Write D4RL's file for `name` as the Minari dataset D4RL_DATASETS[name] (atomic; --overwrite to replace)."""
    register_mazes()
    dataset_id = D4RL_DATASETS[name]
    check_absent(dataset_id, args.overwrite)
    path = find_d4rl_file(args, name)
    register_mazes()
    if name.startswith("maze2d-"):
        maze = name[len("maze2d-"):-len("-v1")]
        cfg = MAZES[maze]
        kw = dict(maze_map=d4rl_maze_map(maze), continuing_task=True, reset_target=False)
        env = gym.make(cfg["gym_id"], **kw)
        eval_env = gym.make(cfg["gym_id"], max_episode_steps=cfg["eval_steps"], **kw)
        obs_dim, act_dim = 4, 2
    else:
        maze, cfg = None, SAC_ENVS[name.split("-", 1)[0]]
        env = eval_env = gym.make(cfg["gym_id"])
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    log(f"{name}: reading {path}")
    data = read_d4rl_file(path, obs_dim, act_dim, maze is not None)
    episodes, info = d4rl_episodes(data, maze)
    if not episodes:
        raise SystemExit(f"error: {path} has no episode of two or more rows; get the file again")
    if info["next_observation_mismatches"]:
        log(f"{name}: warning: {info['next_observation_mismatches']} next_observations differ from the next row "
            f"within an episode; the rows are kept as the observations")
    log(f"{name}: {info}")
    description = dict(source="D4RL", d4rl_name=name, file=os.path.abspath(path), bytes=os.path.getsize(path),
                       gym_id=cfg["gym_id"], split=info)
    return write_dataset(dataset_id, episodes, env.spec, eval_env.spec, cfg["ref_min_score"], cfg["ref_max_score"],
                         f"D4RL {name}", description, args.overwrite)


# ------------------------------------------------------------------------------------------------------ writing
def dataset_root():
    return minari_store()


def check_absent(dataset_id: str, overwrite: bool):
    if not overwrite and os.path.exists(os.path.join(dataset_root(), dataset_id)):
        raise SystemExit(f"error: Minari dataset {dataset_id!r} already exists in {dataset_root()}; "
                         f"pass --overwrite to replace it")


def write_dataset(dataset_id: str, episodes, env, eval_env, ref_min_score: float, ref_max_score: float,
                  algorithm_name: str, description: dict, overwrite: bool):
    """Build the dataset under a hidden temporary root in the Minari store, then rename it into place."""
    import minari
    from minari.namespace import NAMESPACE_METADATA_FILENAME
    check_absent(dataset_id, overwrite)
    root = dataset_root()
    tmp_root = tempfile.mkdtemp(prefix=".tmp-collect-", dir=root)
    old_env = os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = tmp_root
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # author/email/code_permalink are left unset on purpose
            minari.create_dataset_from_buffers(
                dataset_id, episodes, env=env, eval_env=eval_env, algorithm_name=algorithm_name,
                ref_min_score=ref_min_score, ref_max_score=ref_max_score,
                description=json.dumps(description, default=str))
        if old_env is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old_env
        parts = dataset_id.split("/")[:-1]
        for i in range(1, len(parts) + 1):  # namespaces: create them in the real store (metadata file included)
            ns = "/".join(parts[:i])
            os.makedirs(os.path.join(root, ns), exist_ok=True)
            meta = os.path.join(root, ns, NAMESPACE_METADATA_FILENAME)
            if not os.path.exists(meta):
                shutil.copyfile(os.path.join(tmp_root, ns, NAMESPACE_METADATA_FILENAME), meta)
        final = os.path.join(root, dataset_id)
        if os.path.exists(final):
            check_absent(dataset_id, overwrite)
            os.rename(final, os.path.join(tmp_root, "replaced"))
        os.rename(os.path.join(tmp_root, dataset_id), final)
    finally:
        if old_env is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old_env
        shutil.rmtree(tmp_root, ignore_errors=True)
    stats = dataset_stats(minari.load_dataset(dataset_id))
    log(f"wrote {dataset_id} to {os.path.join(root, dataset_id)}: {stats}")
    return stats


def dataset_stats(dataset) -> dict:
    import minari
    try:
        returns = np.array([float(np.sum(ep.rewards)) for ep in dataset.iterate_episodes()])
    except (OSError, RuntimeError, KeyError, ValueError) as e:  # h5py: truncated or garbled file
        raise unreadable(dataset.spec.dataset_id, e) from None
    return dict(episodes=dataset.total_episodes, steps=dataset.total_steps, mean_return=float(returns.mean()),
                mean_normalized_return=float(np.mean(minari.get_normalized_score(dataset, returns))))


# --------------------------------------------------------------------------------------------------------- main
def build_mujoco(args: Args, env_name: str, level: str, overwrite: bool) -> dict:
    cfg = SAC_ENVS[env_name]
    dataset_id = DATASETS[f"{env_name}-{level}"]
    check_absent(dataset_id, overwrite)
    num_steps = DEFAULT_NUM_STEPS if args.num_steps is None else args.num_steps
    env = gym.make(cfg["gym_id"])
    rng = np.random.default_rng(args.seed + 1)
    description = dict(collector="collect_datasets.py", level=level, args=dataclasses.asdict(args),
                       gym_id=cfg["gym_id"])
    if level == "random":
        episodes, returns = rollouts(env, None, num_steps, args.seed, rng, f"{env_name}-random")
        algorithm = "uniform random actions"
    elif level in ("medium", "expert"):
        point = train_sac(args, env_name, level)
        save_policy(policy_file(args, env_name, level), point["actor"], point["obs_dim"], point["act_dim"],
                    point["return"], point["step"])
        policy = NumpyActor(point["actor"], rng, deterministic=args.deterministic_rollouts)
        episodes, returns = rollouts(env, policy, num_steps, args.seed, rng, f"{env_name}-{level}")
        algorithm = f"SAC ({level} point) rollouts, {'deterministic' if args.deterministic_rollouts else 'stochastic'}"
        description["policy"] = {k: point[k] for k in ("return", "step", "cut", "target", "evals")}
    elif level == "medium-replay":
        point = train_sac(args, env_name, "medium")
        episodes = replay_episodes(point["replay"])
        returns = [float(np.sum(ep.rewards)) for ep in episodes]
        algorithm = "SAC replay buffer up to the medium point"
        description["policy"] = {k: point[k] for k in ("return", "step", "cut", "target", "evals")}
    elif level == "medium-expert":
        import minari
        parts = {}
        for sub in ("medium", "expert"):
            sub_id = DATASETS[f"{env_name}-{sub}"]
            if sub_id not in minari.list_local_datasets():
                build_mujoco(args, env_name, sub, overwrite=False)
            parts[sub] = minari.load_dataset(sub_id)
            description[sub] = json.loads(parts[sub].storage.metadata.get("description", "{}"))
        episodes = episodes_of(parts["medium"]) + episodes_of(parts["expert"])
        returns = []
        algorithm = "SAC medium rollouts + SAC expert rollouts"
    else:
        raise ValueError(level)
    description["behaviour_returns_mean"] = float(np.mean(returns)) if returns else None
    return write_dataset(dataset_id, episodes, env.spec, cfg["gym_id"], cfg["ref_min_score"], cfg["ref_max_score"],
                         algorithm, description, overwrite)


def build_maze(args: Args, maze: str) -> dict:
    register_mazes()
    cfg, dataset_id = MAZES[maze], DATASETS[f"maze2d-{maze}"]
    check_absent(dataset_id, args.overwrite)
    env, episodes, goals = maze_rollouts(args, maze, DEFAULT_NUM_STEPS if args.num_steps is None else args.num_steps)
    eval_env = gym.make(cfg["gym_id"], continuing_task=True, reset_target=False, max_episode_steps=cfg["eval_steps"])
    description = dict(collector="collect_datasets.py", level="waypoint controller", args=dataclasses.asdict(args),
                       gym_id=cfg["gym_id"], goals_reached=goals)
    return write_dataset(dataset_id, episodes, env.spec, eval_env.spec, cfg["ref_min_score"], cfg["ref_max_score"],
                         "BFS waypoint + PD controller, random goals", description, args.overwrite)


# valid range of every numeric field (None: the default is used)
RANGES = dict(num_steps="[1, inf)", seed="(-inf, inf)", medium_target="(-inf, inf)", expert_target="(-inf, inf)",
              medium_max_steps="[1, inf)", expert_max_steps="[1, inf)", learning_starts="[0, inf)",
              batch_size="[1, inf)", lr="(0, inf)", gamma="[0, 1]", tau="(0, 1]", eval_freq="[1, inf)",
              eval_episodes="[1, inf)", checkpoint_freq="[1, inf)", log_freq="[1, inf)", maze_episode_len="[1, inf)",
              torch_threads="[1, inf)")


def writable_dir(path: str, flag: str):
    """Create `path` if needed; one line when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {path} is not writable ({e.strerror}); pass another one") from None


def main(args: Args):
    check_ranges(args, RANGES)
    if args.env_id not in DATASETS:
        raise SystemExit(f"error: unknown --env-id {args.env_id!r}; use one of {', '.join(DATASETS)}")
    if args.info:
        dataset = load_dataset(args.env_id)
        try:
            description = json.loads(dataset.storage.metadata.get("description", "{}"))
        except ValueError:  # a dataset from Minari's remote store: free-text description
            description = {}
        policy = description.get("policy", {})
        source = description.get("source", "collect_datasets.py" if "collector" in description else "Minari")
        print(json.dumps({"dataset_id": dataset.spec.dataset_id, "source": source, **dataset_stats(dataset),
                          **{f"policy_{k}": policy[k] for k in ("return", "step", "cut") if k in policy}}))
        return
    writable_dir(dataset_root(), "the Minari store ($MINARI_DATASETS_PATH)")
    if args.env_id not in D4RL_DATASETS and not args.env_id.startswith("maze2d"):
        writable_dir(args.work_dir, "--work-dir")
        writable_dir(args.policy_dir, "--policy-dir")
    t0 = time.time()
    name, level = args.env_id.split("-", 1)
    if args.env_id in D4RL_DATASETS:
        stats = import_d4rl(args, args.env_id)
    elif name == "maze2d":
        stats = build_maze(args, level)
    else:
        stats = build_mujoco(args, name, level, args.overwrite)
    log(f"{args.env_id}: done in {(time.time() - t0) / 60:.1f} min: {stats}")


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    import signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C: the temporary dataset root is removed
    try:
        main(cli_args)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: nothing was written under {DATASETS.get(cli_args.env_id, cli_args.env_id)} "
                         f"(datasets are renamed into place only when complete); a SAC run keeps its last checkpoint "
                         f"in {cli_args.work_dir} and resumes from it") from None
