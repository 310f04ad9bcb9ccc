"""Tests of pets_baseline.py (imported as a module): target-policy loading, the PETS ensemble, the MuJoCo simulator
probe, and a tiny end-to-end run on local Minari datasets built here."""
import csv
import dataclasses
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import tyro
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pets_baseline as pb  # noqa: E402
import pgd_iql  # noqa: E402
import pgd_td3bc  # noqa: E402
from conftest import assert_invalid_value_gives_one_line, write_tiny_dataset  # noqa: E402

NO_WRITER = types.SimpleNamespace(add_scalar=lambda *a, **k: None)
torch.set_num_threads(1)  # small nets: extra threads only add contention on a shared CPU


# ---------------------------------------------------------------- tiny local Minari store
@pytest.fixture(scope="module")
def store(module_minari_store):
    """Tiny `mujoco/{halfcheetah,hopper,walker2d}/medium-v0` datasets in a temporary Minari store (set for the module)."""
    rng = np.random.default_rng(0)
    gentle = lambda d: np.clip(rng.normal(0, 0.3, d), -1, 1)  # noqa: E731
    wild = lambda d: rng.uniform(-1, 1, d)  # noqa: E731  (Walker2d: reaches the +-10 velocity clip)
    for env_name, short, steps, fn, ref in (("HalfCheetah-v5", "halfcheetah", 1200, gentle, (-280.2, 12135.0)),
                                            ("Hopper-v5", "hopper", 400, gentle, (-20.3, 3234.3)),
                                            ("Walker2d-v5", "walker2d", 400, wild, (1.6, 4592.3))):
        write_tiny_dataset(f"mujoco/{short}/medium-v0", env_name, steps, 60, fn, rng, ref)
    return module_minari_store


def real_transitions(short_name: str):
    dataset = pb.load_dataset(short_name)
    episodes = pb.episodes_from_minari(dataset)
    return dataset, episodes, pb.transitions_from_episodes(episodes)


# ---------------------------------------------------------------- shared code
def test_shared_blocks_are_pgd_iqls():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import sync_shared
    ours = sync_shared.blocks(open(os.path.join(ROOT, "pets_baseline.py")).read())
    theirs = sync_shared.blocks(open(os.path.join(ROOT, "pgd_iql.py")).read())
    dydiff = sync_shared.blocks(open(os.path.join(ROOT, "dydiff_td3bc.py")).read())
    assert {"imports", "datasets", "diffuser", "sampler"} <= set(ours) and {"ensemble", "dydiff"} <= set(dydiff)
    assert all(ours[k] == theirs.get(k, dydiff.get(k)) for k in ours)  # PGD's blocks, and DyDiff's ensemble/generator


# ---------------------------------------------------------------- target policies
def _stats(obs_dim):
    return dict(obs_mean=torch.randn(obs_dim), obs_std=torch.rand(obs_dim) + 0.5, return_min=0.0, return_max=1.0)


@pytest.mark.parametrize("module", [pgd_iql, pgd_td3bc], ids=["iql", "td3bc"])
def test_load_policy_reproduces_the_agents_policy(module, tmp_path):
    torch.manual_seed(0)
    agent = module.make_agent(module.Args(hidden_dim=16, total_steps=10), 3, _stats(5))
    if module is pgd_iql:
        with torch.no_grad():
            agent.log_std.copy_(torch.tensor([-1.0, 0.0, 0.5]))
    path = str(tmp_path / "policy.pt")
    torch.save(agent.policy_checkpoint(), path)
    act_fn, log_prob_fn = pb.load_policy(path, obs_dim=5, act_dim=3)
    obs, action = torch.randn(4, 7, 5) * 3, torch.rand(4, 7, 3) * 1.8 - 0.9
    with torch.no_grad():
        torch.testing.assert_close(act_fn(obs, deterministic=True), agent.act(obs))
        torch.testing.assert_close(log_prob_fn(obs, action), agent.log_prob(obs, action))
        agent.actor[-1].weight.zero_(), agent.actor[-1].bias.zero_()  # mean action 0: sampling is not clipped
        if module is pgd_iql:
            agent.log_std.copy_(torch.tensor([-2.0, -1.5, -1.0]))
    torch.save(agent.policy_checkpoint(), path)
    act_fn, _ = pb.load_policy(path)
    spread = act_fn(torch.randn(20_000, 5)).std(0)
    expected = agent.log_std.exp().detach() if module is pgd_iql else torch.zeros(3)
    torch.testing.assert_close(spread, expected, atol=0.01, rtol=0.05)  # stochastic (IQL) vs deterministic (TD3+BC)
    with pytest.raises(SystemExit, match="dataset has 6"):
        pb.load_policy(path, obs_dim=6, act_dim=3)


def test_load_policy_sac_tanh_gaussian_density(tmp_path):
    """The SAC log-likelihood (tanh change of variables) matches collect_datasets' own sampler and integrates to 1."""
    import collect_datasets
    torch.manual_seed(0)
    actor = collect_datasets.Actor(4, 1)
    with torch.no_grad():
        actor.mean.bias.fill_(0.4), actor.log_std.weight.zero_(), actor.log_std.bias.fill_(math.log(0.6))
    path = str(tmp_path / "sac.pt")
    collect_datasets.save_policy(path, actor.state_dict(), 4, 1, 0.0, 0)
    act_fn, log_prob_fn = pb.load_policy(path)
    obs = torch.randn(1, 4)
    with torch.no_grad():
        a, logp = actor.sample(obs.expand(500, 4))
        inside = a.abs().squeeze(-1) < pb.ACTION_CLIP
        torch.testing.assert_close(log_prob_fn(obs.expand(500, 4), a)[inside], logp[inside], atol=1e-4, rtol=1e-4)
        grid = torch.linspace(-pb.ACTION_CLIP, pb.ACTION_CLIP, 20_001)[:, None]
        density = log_prob_fn(obs.expand(len(grid), 4), grid).exp()
        assert abs(torch.trapezoid(density, grid[:, 0]).item() - 1) < 1e-3
        torch.testing.assert_close(act_fn(obs, deterministic=True), torch.tanh(actor(obs)[0]))


# ---------------------------------------------------------------- PETS ensemble
def linear_system_episodes(rng, n_episodes=40, T=100, noise=0.05):
    """s' = s + s A + a B + eps, r = s w + a v + eps (eps ~ N(0, noise^2)); stable under random actions."""
    A = -0.3 * np.eye(3) + 0.05 * rng.normal(size=(3, 3))
    B, w, v = rng.normal(size=(2, 3)) * 0.5, rng.normal(size=3), rng.normal(size=2)
    episodes = []
    for _ in range(n_episodes):
        s, obs, acts, rews = rng.normal(size=3), [], [], []
        for _ in range(T):
            a = rng.uniform(-1, 1, 2)
            obs.append(s), acts.append(a), rews.append(s @ w + a @ v + noise * rng.normal())
            s = s + s @ A + a @ B + noise * rng.normal(size=3)
        obs.append(s)
        episodes.append(dict(obs=np.array(obs, np.float32), actions=np.array(acts, np.float32),
                             rewards=np.array(rews, np.float32), terminals=np.zeros(T, np.float32),
                             timeouts=np.eye(T, dtype=np.float32)[-1]))
    return episodes, (A, B, w, v)


def small_ensemble_args(**kw):
    return pb.Args(**{**dict(ensemble_size=3, num_elites=2, dynamics_hidden=32, dynamics_layers=2, dynamics_steps=600,
                             dynamics_eval_every=100, dynamics_patience=100, dynamics_lr=5e-3, seed=0), **kw})


def test_ensemble_learns_a_linear_system():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    episodes, (A, B, w, v) = linear_system_episodes(rng)
    model, info = pb.train_ensemble(small_ensemble_args(), episodes, NO_WRITER, torch.device("cpu"))
    s, a = torch.randn(2000, 3), torch.rand(2000, 2) * 2 - 1
    As, Bs, ws, vs = (torch.as_tensor(m, dtype=torch.float32) for m in (A, B, w, v))
    true_next, true_r = s + s @ As + a @ Bs, s @ ws + a @ vs
    mean, logvar = model(torch.cat([s, a], -1))
    pred = mean * model.out_std + model.out_mean
    for m in model.elites.tolist():
        next_err = ((s + pred[m, :, :3] - true_next) ** 2).mean() / ((true_next - s) ** 2).mean()
        r_err = ((pred[m, :, 3] - true_r) ** 2).mean() / true_r.var()
        assert next_err < 0.02 and r_err < 0.02, (m, next_err, r_err)
        # the learned Gaussian's std is the noise level (0.05) in env units
        std = (0.5 * logvar[m]).exp() * model.out_std
        assert 0.03 < std.median().item() < 0.08
    assert sorted(info["elites"]) == sorted(np.argsort(info["holdout_mse"])[:2].tolist())
    # sampling: a random elite per row, next obs = obs + sampled delta, close to the truth
    nxt, r = model.step(s, a, torch.Generator().manual_seed(0))
    assert ((nxt - true_next) ** 2).mean() < 0.01 and nxt.shape == (2000, 3) and r.shape == (2000,)


def test_logvar_soft_clamp_and_early_stopping():
    model = pb.ProbabilisticEnsemble(2, 1, 3, 8, 1, 2)
    with torch.no_grad():
        model.net[-1].bias.fill_(1e4)
        _, hi = model(torch.zeros(5, 3))
        model.net[-1].bias.fill_(-1e4)
        _, lo = model(torch.zeros(5, 3))
    assert torch.all((hi - model.max_logvar).abs() < 1e-3) and torch.all((lo - model.min_logvar).abs() < 1e-3)
    assert model.max_logvar.requires_grad and model.min_logvar.requires_grad
    # no member can improve (lr 0): stop after the first evaluation plus `patience` more
    episodes, _ = linear_system_episodes(np.random.default_rng(1), n_episodes=5, T=20)
    _, info = pb.train_ensemble(small_ensemble_args(dynamics_lr=0.0, dynamics_eval_every=10, dynamics_patience=3,
                                                    dynamics_steps=10_000), episodes, NO_WRITER, torch.device("cpu"))
    assert info["steps"] == 40


# ---------------------------------------------------------------- simulator probe
@pytest.mark.parametrize("name", ["halfcheetah-medium", "hopper-medium"])
def test_probe_is_zero_on_real_transitions(store, name):
    dataset, _, tr = real_transitions(name)
    probe = pb.SimulatorProbe(dataset.recover_environment())
    next_obs, rewards, valid = probe.step(tr["obs"], tr["actions"])
    assert valid.mean() > 0.95
    assert np.abs(next_obs[valid] - tr["next_obs"][valid]).max() < 1e-4
    assert np.abs(rewards[valid] - tr["rewards"][valid]).max() < 1e-4
    # not vacuous: another action gives another next state
    other, _, _ = probe.step(tr["obs"][:50], np.clip(tr["actions"][:50] + 0.5, -1, 1))
    assert np.abs(other - tr["next_obs"][:50]).max() > 1e-2


def test_probe_flags_walker_states_at_the_velocity_clip(store):
    dataset, _, tr = real_transitions("walker2d-medium")
    probe = pb.SimulatorProbe(dataset.recover_environment())
    at_clip = (np.abs(tr["obs"][:, 8:]) >= 10 - 1e-3).any(1)
    assert at_clip.any() and not at_clip.all()
    next_obs, _, valid = probe.step(tr["obs"], tr["actions"])
    assert np.array_equal(valid, ~at_clip) and np.isnan(next_obs[~valid]).all()
    assert np.abs(next_obs[valid] - tr["next_obs"][valid]).max() < 1e-4
    # the flag matters: stepped anyway, clipped states do not reproduce the data
    probe.clip = None
    unflagged, _, _ = probe.step(tr["obs"][at_clip], tr["actions"][at_clip])
    assert np.abs(unflagged - tr["next_obs"][at_clip]).max() > 1e-2
    # diagnostics skip them and report the flagged fraction
    probe.clip = 10.0
    traj = dict(obs=torch.as_tensor(np.stack([tr["obs"][:20], tr["next_obs"][:20]], 1)),
                actions=torch.as_tensor(tr["actions"][:20, None]), rewards=torch.as_tensor(tr["rewards"][:20, None]),
                mask=torch.ones(20, 1, dtype=torch.bool))
    d = pb.diagnostics(traj, probe, lambda o, a: -(a ** 2).sum(-1), np.ones(17), torch.device("cpu"))
    assert d["flagged_fraction"] == at_clip[:20].mean() and d["valid_transitions"] == (~at_clip[:20]).sum()
    assert d["dyn_mse_mean"] < 1e-8


# ---------------------------------------------------------------- trajectories
def test_trajectories_from_windows_alignment_and_terminal_mask():
    obs_dim, act_dim, H = 2, 1, 6
    x = torch.zeros(2, H, obs_dim + act_dim + 2)
    x[..., 0] = torch.arange(H).float()  # obs channel 0 = row index
    x[..., obs_dim] = 0.5
    x[1, 2, -1] = 1.0  # window 1: terminal at row 2
    t = pb.trajectories_from_windows(x, obs_dim, act_dim, 4)
    assert t["obs"].shape == (2, 5, 2) and t["actions"].shape == (2, 4, 1) and t["rewards"].shape == (2, 4)
    assert t["obs"][0, :, 0].tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(t["actions"], torch.full((2, 4, 1), math.tanh(0.5)))
    assert t["mask"].tolist() == [[True] * 4, [True, True, False, False]]


# ---------------------------------------------------------------- end to end
def test_end_to_end_tiny(store, tmp_path):
    """pgd_iql.py trains a tiny diffuser and IQL policy (--save-model); pets_baseline.py measures PETS, unguided and
    guided PGD and the data under that policy and a SAC policy, and writes the table, the JSON and the figures."""
    import collect_datasets
    pgd_iql.main(pgd_iql.parse_args([
        "--env-id", "halfcheetah-medium", "--horizon", "8", "--diffuser-channels", "16", "--diffuser-mults", "1", "2",
        "--diffuser-steps", "100", "--sampler-steps", "4", "--total-steps", "100", "--num-synthetic", "300",
        "--regenerate-every", "100", "--eval-every", "100", "--eval-episodes", "1", "--save-model",
        "--runs-root", str(tmp_path / "runs"), "--diffuser-cache-dir", str(tmp_path / "diffusers")]))
    (iql_run,) = (tmp_path / "runs").iterdir()
    (diffuser,) = (tmp_path / "diffusers").glob("*.pt")
    torch.manual_seed(0)
    sac = str(tmp_path / "halfcheetah-sac.pt")
    collect_datasets.save_policy(sac, collect_datasets.Actor(17, 6).state_dict(), 17, 6, 0.0, 0)
    args = tyro.cli(pb.Args, args=[
        "--env-id", "halfcheetah-medium", "--diffuser-checkpoint", str(diffuser),
        "--policy-checkpoints", str(iql_run / "policy.pt"), sac, "--policy-names", "iql", "sac",
        "--guidance-coefs", "0", "2", "--sampler-steps", "6", "--num-trajectories", "24",
        "--ensemble-size", "3", "--num-elites", "2", "--dynamics-hidden", "32", "--dynamics-layers", "2",
        "--dynamics-steps", "200", "--dynamics-eval-every", "50", "--report-steps", "1", "3", "50",
        "--runs-root", str(tmp_path / "pets")])
    summary = pb.main(args)
    (run,) = (tmp_path / "pets").iterdir()
    rows = {(r["policy"], r["method"], r["guidance_coef"]): r for r in summary["rows"]}
    assert set(rows) == {(p, m, c) for p in ("iql", "sac") for m, c in
                         (("dataset", 0.0), ("pets", 0.0), ("pgd", 0.0), ("pgd", 2.0))}
    assert summary["rollout_length"] == 7 and summary["report_steps"] == [1, 3, 7]
    for (policy, method, coef), r in rows.items():
        assert len(r["dyn_mse"]) == 7 and len(r["action_loglik"]) == 7 and r["trajectories"] == 24
        assert all(np.isfinite(r[k]) for k in ("dyn_mse_mean", "dyn_nmse_mean", "action_loglik_mean"))
        if method == "dataset":
            assert r["dyn_mse_mean"] < 1e-8 and r["transitions"] == 24 * 7
        else:
            assert r["dyn_mse_mean"] > 1e-4  # a learned model / an undertrained diffuser is not exact
    for policy in ("iql", "sac"):  # guidance raises the target policy's likelihood of the synthetic actions
        assert rows[(policy, "pgd", 2.0)]["action_loglik_mean"] > rows[(policy, "pgd", 0.0)]["action_loglik_mean"]
    # unguided samples and the data do not depend on the target policy, only their likelihood does
    assert rows[("iql", "pgd", 0.0)]["dyn_mse"] == rows[("sac", "pgd", 0.0)]["dyn_mse"]
    assert rows[("iql", "dataset", 0.0)]["action_loglik_mean"] != rows[("sac", "dataset", 0.0)]["action_loglik_mean"]
    with open(run / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {"dyn_mse@1", "dyn_mse@3", "dyn_mse@7", "action_loglik_mean"} <= set(table[0])
    md = (run / "table.md").read_text().splitlines()
    assert len(md) == 2 + 8 and md[0].startswith("| policy | method | coef | action log-lik | dyn MSE @1")
    assert f"| sac | pets | 0 | {rows[('sac', 'pets', 0.0)]['action_loglik_mean']:.4f} |" in "\n".join(md)
    r = rows[("sac", "pets", 0.0)]
    (line,) = [t for t in table if t["policy"] == "sac" and t["method"] == "pets"]
    assert math.isclose(float(line["dyn_mse@3"]), r["dyn_mse"][2]) and math.isclose(float(line["dyn_mse_mean"]), r["dyn_mse_mean"])
    for fig in ("figure5_action_likelihood.png", "figure6_dynamics_error.png"):
        assert (run / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "results.json").exists() and (run / "dynamics.pt").exists()
    # the saved ensemble is reused with --dynamics-checkpoint (no training) and gives the same PETS numbers
    again = pb.main(dataclasses.replace(args, dynamics_checkpoint=str(run / "dynamics.pt"), runs_root=str(tmp_path / "b")))
    assert "loaded_from" in again["dynamics"]
    assert [r["dyn_mse"] for r in again["rows"] if r["method"] == "pets"] == \
        [r["dyn_mse"] for r in summary["rows"] if r["method"] == "pets"]
    # --sample-horizon: trajectories longer than the diffuser's 8-row training windows (13 rows, 12 transitions)
    longer = pb.main(dataclasses.replace(args, dynamics_checkpoint=str(run / "dynamics.pt"), runs_root=str(tmp_path / "c"),
                                         sample_horizon=13, guidance_coefs=(0.0,), num_trajectories=8))
    assert longer["rollout_length"] == 12
    assert all(len(r["dyn_mse"]) == 12 for r in longer["rows"])
    # DyDiff next to them (--dydiff-checkpoint; an untrained state model of the dataset's 23 channels, 8 rows): from the
    # same start states, its actions the target policy's deterministic ones on its states
    import dydiff_td3bc
    config = dict(unet="residual", diffuser_channels=8, diffuser_mults=(1, 2), diffuser_kernel_size=3, sigma_data=1.0,
                  horizon=8)
    den = dydiff_td3bc.build_denoiser(config, 23)
    torch.save(dict(ema=den.state_dict(), mean=torch.zeros(23), std=torch.ones(23), config=config, data_dim=23,
                    dataset_id="mujoco/halfcheetah/medium-v0", kind="dydiff_state_model"), tmp_path / "state_model.pt")
    dy = pb.main(dataclasses.replace(args, dynamics_checkpoint=str(run / "dynamics.pt"), runs_root=str(tmp_path / "d"),
                                     dydiff_checkpoint=str(tmp_path / "state_model.pt"), dydiff_sampler_steps=4,
                                     guidance_coefs=(0.0,), num_trajectories=8))
    rows = {(r["policy"], r["method"]): r for r in dy["rows"]}
    assert {("iql", "dydiff"), ("sac", "dydiff")} <= set(rows) and dy["rollout_length"] == 7
    assert all(len(rows[(p, "dydiff")]["dyn_mse"]) == 7 and np.isfinite(rows[(p, "dydiff")]["dyn_mse_mean"])
               for p in ("iql", "sac"))
    # IQL's Gaussian is densest at its mean: relabelled (deterministic) actions beat PETS's sampled ones
    assert rows[("iql", "dydiff")]["action_loglik_mean"] > rows[("iql", "pets")]["action_loglik_mean"]
    bad = dataclasses.replace(args, dynamics_checkpoint=str(run / "dynamics.pt"), dydiff_checkpoint=str(diffuser))
    with pytest.raises(SystemExit, match="not a DyDiff state model"):
        pb.main(bad)


def test_bad_inputs_give_clear_errors(store, tmp_path):
    with pytest.raises(SystemExit, match="at least one --policy-checkpoints"):
        pb.main(pb.Args(env_id="hopper-medium", runs_root=str(tmp_path)))
    with pytest.raises(SystemExit, match="does not exist"):
        pb.main(pb.Args(env_id="hopper-medium", policy_checkpoints=(str(tmp_path / "nope.pt"),), runs_root=str(tmp_path)))
    with pytest.raises(SystemExit, match="num-elites"):
        pb.main(pb.Args(env_id="hopper-medium", policy_checkpoints=("x",), num_elites=9, runs_root=str(tmp_path)))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_invalid_numeric_field_gives_one_line(data):
    assert_invalid_value_gives_one_line(pb, pb.RANGES, data.draw, st)
    pb.check_ranges(pb.Args(), pb.RANGES)  # the defaults are valid


def test_probe_reproduces_pointmaze_transitions(minari_store, tmp_path):
    """The probe on PointMaze (maze2d): qpos/qvel/goal set from the flat observation; real transitions come back."""
    import collect_datasets as cd
    cd.main(cd.Args(env_id="maze2d-umaze", num_steps=600, maze_episode_len=300, work_dir=str(tmp_path / "w"),
                    policy_dir=str(tmp_path / "p")))
    dataset = pb.load_dataset("maze2d-umaze")
    tr = pb.transitions_from_episodes(pb.episodes_from_minari(dataset))
    probe = pb.SimulatorProbe(dataset.recover_environment())
    assert probe.obs_dim == tr["obs"].shape[1] == 8
    next_obs, rewards, valid = probe.step(tr["obs"], tr["actions"])
    assert valid.all()
    state = [0, 1, 4, 5, 6, 7]  # achieved goal and [x, y, vx, vy]; channels 2:4 are the desired goal
    assert np.abs(next_obs[:, state] - tr["next_obs"][:, state]).max() < 1e-5
    kept = (tr["next_obs"][:, 2:4] == tr["obs"][:, 2:4]).all(1)  # the collector replaces a reached goal
    assert 0 < (~kept).sum() < 0.1 * len(kept)
    assert np.abs(next_obs[kept, 2:4] - tr["next_obs"][kept, 2:4]).max() < 1e-6
    assert np.abs(rewards - tr["rewards"]).max() < 1e-6
    assert list(probe.dims) == state  # the dynamics error leaves the replaced goal out: real data scores 0
    one_step = dict(obs=np.stack([tr["obs"], tr["next_obs"]], 1), actions=tr["actions"][:, None],
                    rewards=tr["rewards"][:, None])  # every real transition, those with a new goal included
    traj = {k: torch.as_tensor(v) for k, v in one_step.items()} | dict(mask=torch.ones(len(kept), 1, dtype=torch.bool))
    diag = pb.diagnostics(traj, probe, lambda o, a: torch.zeros(a.shape[:-1]), np.ones(8), torch.device("cpu"))
    assert diag["dyn_mse_mean"] < 1e-9
    other, _, _ = probe.step(tr["obs"][:50], np.clip(tr["actions"][:50] * -1, -1, 1))
    assert np.abs(other[:, 4:6] - tr["next_obs"][:50, 4:6]).max() > 1e-3  # another action, another position
