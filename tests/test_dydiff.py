"""DyDiff (dydiff_td3bc.py): the generator's invariants, the terminal rules against the v5 envs, the action-conditioned
model on a linear system, and a tiny end-to-end run."""
import json
import os
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dydiff_td3bc as dd  # noqa: E402

OBS, ACT = 3, 2


def tiny_ensemble(obs_dim=OBS, act_dim=ACT, seed=0):
    torch.manual_seed(seed)
    return dd.ProbabilisticEnsemble(obs_dim, act_dim, members=3, hidden=16, layers=2, num_elites=2)


def tiny_sampler(obs_dim=OBS, act_dim=ACT, steps=4, seed=0):
    torch.manual_seed(seed)
    config = dict(unet="residual", diffuser_channels=8, diffuser_mults=(1, 2), diffuser_kernel_size=3, sigma_data=1.0)
    den = dd.build_denoiser(config, obs_dim + act_dim).requires_grad_(False)
    torch.nn.init.normal_(den.net.out[-1].weight, std=0.1)  # not the zero-initialised output layer
    norm = dd.Normalizer(torch.randn(obs_dim + act_dim) * 0.1, torch.rand(obs_dim + act_dim) + 0.5)
    return dd.GuidedEDMSampler(den, norm, obs_dim, act_dim, **{**dd.DYDIFF_SAMPLER, "sampler_steps": steps})


def policy(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(OBS, ACT)
    return lambda s: torch.tanh(net(s))


def test_after_m_iterations_actions_are_the_policy_on_the_generated_states_and_s0_is_kept():
    act_fn, start = policy(), torch.randn(8, OBS)
    out = dd.dydiff_rollouts(tiny_sampler(), tiny_ensemble(), act_fn, start, 6, 2, torch.Generator().manual_seed(0))
    assert out["obs"].shape == (8, 6, OBS) and out["actions"].shape == (8, 6, ACT)
    torch.testing.assert_close(out["actions"], act_fn(out["obs"]).clamp(-dd.ACTION_CLIP, dd.ACTION_CLIP))
    assert torch.equal(out["obs"][:, 0], start)
    m0 = dd.dydiff_rollouts(tiny_sampler(), tiny_ensemble(), act_fn, start, 6, 0, torch.Generator().manual_seed(0))
    assert not torch.allclose(out["obs"], m0["obs"])  # the state model did change the states


def test_zero_iterations_return_the_ensembles_trajectory():
    act_fn, start, ens = policy(), torch.randn(8, OBS), tiny_ensemble()
    out = dd.dydiff_rollouts(tiny_sampler(), ens, act_fn, start, 5, 0, torch.Generator().manual_seed(3))
    gen, s = torch.Generator().manual_seed(3), start
    for t in range(5):
        a = act_fn(s).clamp(-dd.ACTION_CLIP, dd.ACTION_CLIP)
        torch.testing.assert_close(out["obs"][:, t], s)
        torch.testing.assert_close(out["actions"][:, t], a)
        s = ens.step(s, a, gen, deterministic=True)[0]


def test_iteration_averages_the_sampled_states_with_the_previous_ones():
    """One iteration: s_t = (sampled_t + previous_t) / 2 for t >= 1, the sampled states coming from one inpainted pass
    with the same noise."""
    act_fn, start, ens, sampler = policy(), torch.randn(4, OBS), tiny_ensemble(), tiny_sampler()
    m0 = dd.dydiff_rollouts(sampler, ens, act_fn, start, 5, 0, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    m1 = dd.dydiff_rollouts(sampler, ens, act_fn, start, 5, 1, gen)
    gen = torch.Generator().manual_seed(1)
    dd.dydiff_rollouts(sampler, ens, act_fn, start, 5, 0, gen)  # advance the generator past the ensemble rollout
    known = dd.state_model_known(5, OBS, ACT)[None]
    values = sampler.normalizer.normalize(torch.cat([m0["obs"], torch.atanh(m0["actions"])], -1))
    sampled = sampler.normalizer.unnormalize(sampler(4, 5, gen, inpaint=(known, values)))[..., :OBS]
    torch.testing.assert_close(m1["obs"][:, 1:], (sampled[:, 1:] + m0["obs"][:, 1:]) / 2)


class RecordingNet(torch.nn.Module):
    """F(x; c_noise) = 0.1 x, recording what F is given."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x, c_noise):
        self.inputs.append(x.clone())
        return 0.1 * x


@pytest.mark.parametrize("clean", [False, True])
def test_clean_known_input_gives_the_network_the_clamped_entries_unscaled_at_every_call(clean):
    """--clean-known-input: at every denoiser call of an inpainted sampling pass (after the churn too) the U-Net reads
    s_0 and the actions exactly as given; DyDiff's way (the default) hands them over scaled by c_in and, in the churned
    calls, noised."""
    net, H = RecordingNet(), 5
    den = dd.EDMDenoiser(net, sigma_data=1.0, clean_known_input=clean)
    norm = dd.Normalizer(torch.zeros(OBS + ACT), torch.ones(OBS + ACT))
    sampler = dd.GuidedEDMSampler(den, norm, OBS, ACT, **{**dd.DYDIFF_SAMPLER, "sampler_steps": 6})
    known = dd.state_model_known(H, OBS, ACT)[None].expand(3, H, OBS + ACT)
    values = torch.randn(3, H, OBS + ACT)
    sampler(3, H, torch.Generator().manual_seed(0), inpaint=(known, values))
    assert len(net.inputs) == 2 * 6 - 1
    exact = [torch.equal(x[known], values[known]) for x in net.inputs]
    assert all(exact) if clean else not any(exact)
    # training sees them the same way
    net.inputs.clear()
    dd.edm_loss(den, values, -1.2, 1.2, known=known)
    assert torch.equal(net.inputs[0][known], values[known]) == clean


def test_reward_filter_keeps_the_top_fraction():
    returns = torch.arange(10.0)
    assert dd.reward_filter(returns, 0.6).tolist() == [False] * 4 + [True] * 6
    assert dd.reward_filter(returns, 1.0).all()


def test_transitions_stop_at_the_first_terminal_and_respect_the_filter():
    ens = tiny_ensemble()
    obs = torch.randn(4, 6, OBS)
    obs[0, 3, 0] = 100.0  # s_3 of trajectory 0 is terminal
    traj = dict(obs=obs, actions=torch.rand(4, 6, ACT) * 2 - 1)
    out, stats = dd.dydiff_transitions(traj, ens, lambda o: o[..., 0] > 50, keep=1.0)
    assert stats["kept"] == 4 and stats["transitions"] == 3 + 3 * 5  # 3 transitions up to the terminal, 5 each else
    assert out["dones"].sum() == 1 and out["dones"][2] == 1 and torch.equal(out["next_obs"][2], obs[0, 3])
    torch.testing.assert_close(out["rewards"][:3], ens.reward(obs[0, :3], traj["actions"][0, :3]))


@pytest.mark.parametrize("env_id", ["Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"])
def test_terminal_rules_match_the_v5_envs_terminations(env_id):
    env = gym.make(env_id)
    rule = dd.terminal_fn(env)
    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for episode in range(30):
        env.reset(seed=episode)
        while True:
            obs, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
            assert bool(rule(obs[None])[0]) == terminated
            seen[terminated] += 1
            if terminated or truncated:
                break
    assert seen[False] > 100 and (seen[True] > 10 or env_id.startswith("HalfCheetah"))


STATE_MODEL_STEPS = 800


def test_action_conditioned_model_follows_linear_dynamics():
    """On s' = A s + B a (2-D state, 1-D action, 4-row windows), a small state model trained with s_0 and the actions
    inpainted generates states that follow the true dynamics given new actions: RMSE under a quarter of the states'
    spread (0.165 of 0.99 when written) and under half of the RMSE the same model gives with another trajectory's
    actions (0.54)."""
    rng = np.random.default_rng(0)
    A, B = np.array([[0.9, 0.2], [-0.2, 0.9]]), np.array([[0.3], [1.0]])
    H, N = 4, 4000

    def rollout(s0, actions):
        s = [s0]
        for t in range(H - 1):
            s.append(s[-1] @ A.T + actions[:, t] @ B.T)
        return np.stack(s, 1)

    acts = rng.uniform(-0.9, 0.9, (N, H, 1))
    states = rollout(rng.normal(0, 1, (N, 2)), acts)
    windows = np.concatenate([states, np.arctanh(acts)], -1).astype(np.float32)
    config = dict(unet="residual", diffuser_channels=16, diffuser_mults=(1, 2), diffuser_kernel_size=3,
                  diffuser_steps=STATE_MODEL_STEPS, diffuser_epochs=0, diffuser_batch_size=64, diffuser_lr=2e-3,
                  diffuser_warmup=0.02,
                  diffuser_warmup_start=0.0, ema_decay=0.99, ema_every=1, sigma_data=1.0, P_mean=-1.2, P_std=1.2, seed=0)

    class NoWriter:
        def add_scalar(self, *a):
            pass

    torch.manual_seed(0)
    known = dd.state_model_known(H, 2, 1)
    den, norm, _ = dd.train_diffuser(config, windows, windows[:256], NoWriter(), torch.device("cpu"), known)
    sampler = dd.GuidedEDMSampler(den.requires_grad_(False), norm, 2, 1, **{**dd.DYDIFF_SAMPLER, "sampler_steps": 18})
    test_acts = rng.uniform(-0.9, 0.9, (256, H, 1))
    truth = rollout(rng.normal(0, 1, (256, 2)), test_acts)
    values = norm.normalize(torch.as_tensor(np.concatenate([truth, np.arctanh(test_acts)], -1), dtype=torch.float32))
    x = norm.unnormalize(sampler(256, H, torch.Generator().manual_seed(0), inpaint=(known[None], values)))
    rmse = float(np.sqrt(((x[..., :2].numpy() - truth)[:, 1:] ** 2).mean()))
    shuffled = values[torch.randperm(256)]
    shuffled[:, 0] = values[:, 0]  # the right s_0, another trajectory's actions
    y = norm.unnormalize(sampler(256, H, torch.Generator().manual_seed(0), inpaint=(known[None], shuffled)))
    rmse_wrong_actions = float(np.sqrt(((y[..., :2].numpy() - truth)[:, 1:] ** 2).mean()))
    spread = float(truth[:, 1:].std())
    print(f"rmse {rmse:.3f}, with another trajectory's actions {rmse_wrong_actions:.3f}, state spread {spread:.3f}")
    assert rmse < 0.25 * spread and rmse < 0.5 * rmse_wrong_actions, (rmse, rmse_wrong_actions, spread)


# ---------------------------------------------------------------- end to end
TINY = ["--env-id", "hopper-medium-replay", "--horizon", "8", "--diffuser-channels", "8", "--diffuser-mults", "1", "2",
        "--diffuser-steps", "60", "--sampler-steps", "4", "--dynamics-steps", "60", "--dynamics-eval-every", "20",
        "--dynamics-hidden", "32", "--ensemble-size", "3", "--num-elites", "2", "--total-steps", "200",
        "--rollout-every", "100", "--rollout-batch", "64", "--sample-batch-size", "32", "--eval-every", "100",
        "--eval-episodes", "2", "--log-every", "50"]


def run(args, store, tmp_path, check=True):
    env = {**os.environ, "MINARI_DATASETS_PATH": store, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "dydiff_td3bc.py"), *args, "--runs-root", str(tmp_path / "runs")],
                       env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_end_to_end_tiny(tiny_store, tmp_path):
    p = run(TINY + ["--save-model", "--no-clean-known-input"], tiny_store, tmp_path)
    (run_dir,) = (tmp_path / "runs").iterdir()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and [h["step"] for h in res["history"]] == [100, 200]
    gens = res["time_breakdown"]["regenerations"]
    assert [g["step"] for g in gens] == [1, 101] and all(g["kept"] == round(0.6 * 64) or g["kept"] >= 38 for g in gens)
    assert all(0 < g["transitions"] <= g["kept"] * 7 for g in gens) and "q_synthetic" in res["history"][-1]
    assert "time: data" in p.stdout
    check = res["state_model_check"]  # s_0 is given, so its error is exactly 0; the later states are generated
    assert len(check["rollout_mse"]) == 8 and check["rollout_mse"][0] == 0 and min(check["rollout_mse"][1:]) > 0
    assert set(check["step1_denoise_mse"]) == {"0.1", "1", "10", "80"}
    # the saved state model is reusable (with its own conditioning, not the default clean input), and a wrong
    # checkpoint is one line
    again = run(TINY + ["--state-model-checkpoint", str(run_dir / "state_model.pt"), "--save-model"], tiny_store,
                tmp_path / "b")
    assert "training diffuser" not in again.stdout
    (again_dir,) = (tmp_path / "b" / "runs").iterdir()
    saved = torch.load(again_dir / "state_model.pt", weights_only=True)
    assert saved["config"].get("clean_known_input", False) is False
    assert json.loads((again_dir / "results.json").read_text())["state_model_check"] == check
    bad = run(TINY + ["--state-model-checkpoint", str(run_dir / "policy.pt")], tiny_store, tmp_path / "c", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_sigterm_then_resume_gives_the_uninterrupted_numbers(tiny_store, tmp_path):
    """A run stopped by SIGTERM (a SLURM preemption) writes checkpoint.pt (ensemble, state model, agent, ring buffer,
    RNG states) and --resume finishes it with the numbers of a run never stopped; a finished run is not rerun."""
    flags = TINY[:TINY.index("--total-steps")] + ["--total-steps", "400", "--checkpoint-every", "50"] + \
        TINY[TINY.index("--total-steps") + 2:]
    run(flags, tiny_store, tmp_path / "whole")
    (whole,) = (tmp_path / "whole" / "runs").iterdir()
    expected = json.loads((whole / "results.json").read_text())
    assert not (whole / "checkpoint.pt").exists() and expected["resumed_from_step"] is None

    root = tmp_path / "cut" / "runs"
    env = {**os.environ, "MINARI_DATASETS_PATH": tiny_store, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "dydiff_td3bc.py"), *flags, "--runs-root", str(root), "--resume"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(root.glob("*/checkpoint.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + signal.SIGTERM and "continue with --resume" in out, out[-3000:]
    (cut,) = root.iterdir()
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    step = ckpt["step"]
    assert 50 <= step < 400 and not (cut / "results.json").exists() and ckpt["wall_time_s"] > 0
    torch.save({**ckpt, "wall_time_s": 1000.0}, cut / "checkpoint.pt")  # as if the first sitting had taken 1000 s

    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    sitting = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resumed {cut} at step {step + 1}" in p.stdout and "training diffuser" not in p.stdout
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["history"] == expected["history"] and resumed["resumed_from_step"] == step
    assert 1000 < resumed["wall_time_s"] <= 1000 + sitting  # the earlier sitting's wall time is counted
    same = ("step", "kept", "transitions", "action_log_prob")
    assert [{k: g[k] for k in same} for g in resumed["time_breakdown"]["regenerations"]] == \
        [{k: g[k] for k in same} for g in expected["time_breakdown"]["regenerations"]]
    assert not (cut / "checkpoint.pt").exists()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "finished already" in again.stdout and len(list(root.iterdir())) == 1


def test_bad_inputs_give_one_line(tiny_store, tmp_path):
    for flags in (["--env-id", "nonsense"], ["--keep-fraction", "0"], ["--iterations", "-1"],
                  ["--num-elites", "9", "--ensemble-size", "3"]):
        p = run(flags, tiny_store, tmp_path, check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.startswith("error:"), (flags, p.stderr)
