"""Tests of toy2d.py (imported as a module): the toy environment, policies, metrics and world model, and one `--quick`
run of the whole experiment as a subprocess (diffuser, guided sampler sweep, figures, metrics.json)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402
from conftest import assert_invalid_value_gives_one_line  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_args(**kw):
    return toy2d.Args(**{"num_episodes": 40, "wm_steps": 200, **kw})


# ---------------------------------------------------------------- environment, policies, metrics (fast)
def test_env_dynamics_clip_and_truncation():
    args = small_args(start_noise=0.0)
    env = toy2d.Toy2DEnv(args)
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, args.start)
    obs2, reward, terminated, truncated, _ = env.step(np.array([0.5, -1.0], dtype=np.float32))
    np.testing.assert_allclose(obs2, np.asarray(args.start) + args.step_size * np.array([0.5, -1.0]), atol=1e-6)
    assert reward == pytest.approx(-np.linalg.norm(obs2 - np.asarray(args.goal_b)), abs=1e-6)
    assert not terminated and not truncated
    s = toy2d.true_dynamics(torch.tensor([[args.box - 0.01, 0.0]]), torch.tensor([[5.0, 0.0]]), args)
    torch.testing.assert_close(s, torch.tensor([[args.box, 0.0]]))  # action clipped to 1, position to the box
    for _ in range(args.episode_steps - 1):
        *_, truncated, _ = env.step(np.zeros(2, dtype=np.float32))
    assert truncated


def test_current_pushes_down_in_the_right_half_only():
    args = small_args(current=0.5)
    obs, still = torch.tensor([[-0.8, 0.5], [0.1, 0.5], [0.8, 0.5]]), torch.zeros(3, 2)
    moved = toy2d.true_dynamics(obs, still, args) - obs
    torch.testing.assert_close(moved[:, 0], torch.zeros(3))
    torch.testing.assert_close(moved[:, 1], torch.tensor([-0.05 * torch.sigmoid(torch.tensor(-9.0)).item(), -0.025,
                                                          -0.05 * torch.sigmoid(torch.tensor(7.0)).item()]))
    assert moved[2, 1] < -0.049 and moved[0, 1] > -1e-5


def test_target_log_prob_is_the_gaussian_around_the_goal_b_direction():
    args = small_args()
    obs, action = torch.randn(7, 3, 2) * 0.5, torch.rand(7, 3, 2) * 2 - 1
    mean = torch.tanh(args.policy_gain * (torch.tensor(args.goal_b) - obs))
    expected = torch.distributions.Normal(mean, args.target_std).log_prob(action).sum(-1)
    torch.testing.assert_close(toy2d.TargetPolicy(args).log_prob(obs, action), expected)


def test_behaviour_data_heads_to_goal_a_and_target_rollouts_to_goal_b():
    args = small_args(behaviour_goal_std=0.0)
    episodes = toy2d.collect_behaviour_dataset(args, seed=0)
    ends = np.stack([e["obs"][-1] for e in episodes])
    assert np.linalg.norm(ends - np.asarray(args.goal_a), axis=1).mean() < 0.2
    assert all(np.abs(e["actions"]).max() < 1 for e in episodes)  # arctanh of the diffused channel stays finite
    obs, actions = toy2d.target_rollouts(args, 32, torch.Generator().manual_seed(0))
    m = toy2d.trajectory_metrics(obs, actions, args)
    assert m["end_dist_b"] < 0.15 and m["frac_closer_to_b"] == 1.0
    # the real dynamics have no dynamics error or drift; the behaviour's actions are unlikely under the target
    assert m["dynamics_error"] < 1e-6 and m["drift"] < 1e-5
    windows = toy2d.make_windows(episodes, args.horizon, args.window_stride)
    b_obs, b_act = toy2d.split_windows(torch.as_tensor(windows))
    mb = toy2d.trajectory_metrics(b_obs, b_act, args)
    assert mb["dynamics_error"] < 1e-3 and mb["target_log_prob"] < m["target_log_prob"] - 10


def test_metrics_see_dynamics_errors():
    args = small_args()
    obs, actions = toy2d.target_rollouts(args, 16, torch.Generator().manual_seed(0))
    shifted = obs.clone()
    shifted[:, 5:] += torch.tensor([0.05, 0.0])  # one bad transition, then consistent again
    m = toy2d.trajectory_metrics(shifted, actions, args)
    assert m["dynamics_error"] == pytest.approx(0.05 / actions.shape[1], rel=1e-3)
    assert m["drift"] == pytest.approx(0.05, rel=1e-3)
    assert m["late_dynamics_error"] < 1e-6  # the bad step (t=4) is in the first half of the 31 steps
    late = obs.clone()
    late[:, 20:] += torch.tensor([0.0, 0.05])
    errors = toy2d.step_errors(late, actions, args)
    assert errors.argmax() == 19 and errors[19] == pytest.approx(0.05, rel=1e-3)
    assert toy2d.trajectory_metrics(late, actions, args)["late_dynamics_error"] == pytest.approx(0.05 / 16, rel=1e-3)


def test_world_model_learns_the_dynamics_and_its_error_compounds(tmp_path):
    args = small_args()
    episodes = toy2d.collect_behaviour_dataset(args, seed=0)
    real = {k: torch.as_tensor(v) for k, v in toy2d.transitions_from_episodes(episodes).items()}
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    wm = toy2d.WorldModel(args)
    loss = wm.fit(real["obs"], real["actions"], real["next_obs"], gen, toy2d.SummaryWriter(str(tmp_path)))
    assert loss < 0.05  # MSE of (s' - s) / step_size, whose variance is ~0.5
    policy = toy2d.TargetPolicy(args)
    starts = real["obs"][:64]
    short = toy2d.trajectory_metrics(*wm.rollout(starts, 2, policy, gen), args)
    long = toy2d.trajectory_metrics(*wm.rollout(starts, 30, policy, gen), args)
    assert short["dynamics_error"] < 0.02
    assert long["drift"] > short["drift"]


def world_model_step_errors(log_dir, **kw) -> torch.Tensor:
    """One-step error by step of 31-step target-policy rollouts from the start, in a world model fitted to the data."""
    args = small_args(num_episodes=200, wm_steps=800, **kw)
    episodes = toy2d.collect_behaviour_dataset(args, seed=0)
    real = {k: torch.as_tensor(v) for k, v in toy2d.transitions_from_episodes(episodes).items()}
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    wm = toy2d.WorldModel(args)
    wm.fit(real["obs"], real["actions"], real["next_obs"], gen, toy2d.SummaryWriter(str(log_dir)))
    starts, _ = toy2d.target_rollouts(args, 128, gen)
    return toy2d.step_errors(*wm.rollout(starts[:, 0], args.horizon - 1, toy2d.TargetPolicy(args), gen), args)


def test_world_model_error_compounds_only_where_it_must_extrapolate(tmp_path):
    # default toy: linear dynamics, data fanned out -> the world model is about as good at step 30 as at step 0
    linear = world_model_step_errors(tmp_path)
    assert linear[15:].mean() < 0.01
    # a current the narrow data rarely meets -> its one-step error grows along the rollout toward goal B
    current = world_model_step_errors(tmp_path, current=0.5, behaviour_goal_std=0.15)
    assert current[15:].mean() > 3 * current[:2].mean() and current[15:].mean() > 2 * linear[15:].mean()


# ---------------------------------------------------------------- the whole experiment, once (--quick)
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python toy2d.py --quick` as a user runs it; its metrics.json (the summary main() returns) and the root dir."""
    root = tmp_path_factory.mktemp("toy2d")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "toy2d.py"), "--quick", "--runs-root", str(root / "runs"),
                        "--docs-figure", str(root / "docs" / "toy2d.png")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (run_dir,) = (root / "runs").iterdir()
    summary = json.load(open(run_dir / "metrics.json"))
    summary["stdout"] = p.stdout
    return summary, root


def test_unguided_samples_stay_near_the_behaviour_distribution(quick_run):
    summary, _ = quick_run
    methods, sweep = summary["methods"], summary["sweep"]
    unguided, behaviour, target = methods["unguided diffusion"], methods["behaviour dataset"], methods["target policy (real env)"]
    assert sweep[0]["guidance_coef"] == 0 and sweep[0]["target_log_prob"] == unguided["target_log_prob"]
    # end points: mostly near goal A, like the data (not like the target policy, which always ends nearer B)
    assert unguided["end_dist_a"] < unguided["end_dist_b"]
    assert abs(unguided["frac_closer_to_b"] - behaviour["frac_closer_to_b"]) < 0.25
    # actions: as unlikely under the target policy as the behaviour's are
    gap = target["target_log_prob"] - behaviour["target_log_prob"]
    assert abs(unguided["target_log_prob"] - behaviour["target_log_prob"]) < 0.3 * gap


def test_guidance_raises_target_likelihood_monotonically(quick_run):
    summary, _ = quick_run
    sweep = summary["sweep"]
    lams = [s["guidance_coef"] for s in sweep]
    log_probs = [s["target_log_prob"] for s in sweep]
    assert lams == sorted(lams) and len(lams) >= 3
    assert all(b > a for a, b in zip(log_probs, log_probs[1:])), log_probs
    assert log_probs[-1] > log_probs[0] + 5
    assert sweep[-1]["end_dist_b"] < sweep[0]["end_dist_b"]  # the states move toward goal B too


@pytest.mark.xfail(strict=True, reason="known gap (see README 'Toy 2-D experiment'): with the default data the MLP "
                   "world model learns the dynamics almost exactly (no compounding), and guided samples' states lag "
                   "their guided actions, so policy-guided diffusion's late one-step error exceeds the world model's")
def test_guided_dynamics_error_below_world_model_at_long_horizon(quick_run):
    summary, _ = quick_run
    methods = summary["methods"]
    (wm_full,) = [m for k, m in methods.items() if k.startswith("world model") and "from start" in k]
    assert all(s["late_dynamics_error"] < wm_full["late_dynamics_error"] for s in summary["sweep"])


def test_figures_and_metrics_are_written(quick_run):
    summary, root = quick_run
    run_dir = summary["run_dir"]
    names = sorted(os.path.basename(p) for p in summary["figures"])
    assert names == ["toy2d.png", "toy2d_panel.png", "toy2d_sweep.png"]
    for path in summary["figures"] + [str(root / "docs" / "toy2d.png")]:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000, path
    assert os.path.getsize(root / "docs" / "toy2d.png") < 300_000
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert saved["methods"].keys() == summary["methods"].keys() and len(saved["sweep"]) == len(summary["sweep"])
    for m in saved["methods"].values():
        assert {"target_log_prob", "dynamics_error", "late_dynamics_error", "drift", "end_dist_a", "end_dist_b"} <= m.keys()
        assert all(np.isfinite(v) for v in m.values())
    curves = saved["step_errors"]  # one-step error by trajectory step: the world model's and each lambda's
    assert list(curves) == ["world model"] + [f"diffusion, lambda={s['guidance_coef']:g}" for s in saved["sweep"]]
    assert all(len(c) == summary["args"]["horizon"] - 1 and np.all(np.isfinite(c)) for c in curves.values())
    for s in saved["sweep"]:
        curve = curves[f"diffusion, lambda={s['guidance_coef']:g}"]
        assert np.mean(curve) == pytest.approx(s["dynamics_error"], rel=1e-5)
    assert os.path.isfile(os.path.join(run_dir, "diffuser.pt"))


def test_quick_run_has_the_default_runs_table_phases_and_figure_path(quick_run):
    """--quick shrinks sizes only: the metric table has the rows and columns a default run has (one row per guidance
    coefficient of the sweep), the phases are printed with their times as they end, and the figure's path last."""
    summary, _ = quick_run
    args, default = summary["args"], toy2d.Args()
    assert args["horizon"] == default.horizon and args["wm_rollout_length"] == default.wm_rollout_length
    assert not set(toy2d.QUICK) & {"horizon", "wm_rollout_length", "episode_steps", "goal_a", "goal_b", "start"}
    lams = sorted(set(args["guidance_sweep"]) | {0.0, args["guidance_coef"]})
    assert list(summary["methods"]) == [
        "target policy (real env)", "behaviour dataset", f"world model, k={default.wm_rollout_length} from data",
        f"world model, {default.horizon - 1} steps from start", "unguided diffusion",
        *[f"policy-guided diffusion, lambda={lam:g}" for lam in lams if lam]]
    metrics = {"target_log_prob", "dynamics_error", "late_dynamics_error", "drift", "end_dist_a", "end_dist_b",
               "frac_closer_to_b"}
    for m in summary["methods"].values():
        assert set(m) == metrics | {f"se_{k}" for k in metrics} | {"steps", "trajectories"}
    table = toy2d.metric_table(summary["methods"]).splitlines()
    assert len(table) == 2 + len(summary["methods"]) and all(line.count("|") == 9 for line in table)
    phases = ["data", "world model", "diffuser training", "reference rollouts", "sampling", "metrics and figures"]
    assert list(summary["phase_times_s"]) == phases
    assert sum(summary["phase_times_s"].values()) <= summary["wall_time_s"] + 1e-6
    out = summary["stdout"].splitlines()
    printed = [next(i for i, line in enumerate(out) if line.startswith("[toy2d") and f"] {ph}: " in line) for ph in phases]
    assert printed == sorted(printed)  # printed as each phase ends, in order
    assert out[-1] == f"figure: {summary['figures'][-1]}" and os.path.isfile(summary["figures"][-1])


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_invalid_numeric_field_gives_one_line(data):
    assert_invalid_value_gives_one_line(toy2d, toy2d.RANGES, data.draw, st)
    toy2d.check_ranges(toy2d.Args(), toy2d.RANGES)  # the defaults are valid
