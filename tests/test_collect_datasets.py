"""Tests of collect_datasets.py: real (tiny) Minari datasets written into a temporary store and read back."""
import json
import os
import subprocess
import sys

import minari
import numpy as np
import pytest
import torch

import collect_datasets as cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A SAC run small enough for a test: unreachable targets, so the medium point is cut at step 300, the expert at 400.
TINY_SAC = dict(learning_starts=100, eval_freq=100, eval_episodes=1, batch_size=32, medium_target=1e9,
                expert_target=1e9, medium_max_steps=300, expert_max_steps=400, checkpoint_freq=100, log_freq=100)


def args(tmp_path, **kw):
    return cd.Args(**{"work_dir": str(tmp_path / "work"), "policy_dir": str(tmp_path / "policies"), **kw})


def check_episodes(dataset, obs_dim, act_dim):
    steps = 0
    for ep in dataset.iterate_episodes():
        n = len(ep.rewards)
        obs = ep.observations if not isinstance(ep.observations, dict) else ep.observations["observation"]
        assert obs.shape == (n + 1, obs_dim) and ep.actions.shape == (n, act_dim)
        assert ep.terminations.shape == ep.truncations.shape == (n,)
        ends = ep.terminations | ep.truncations
        assert not ends[:-1].any(), "an episode flag before the last step"
        assert ep.terminations[-1] != ep.truncations[-1], "the last step needs exactly one of terminated/truncated"
        steps += n
    assert steps == dataset.total_steps


def test_random_dataset(minari_store, tmp_path, capsys):
    cd.main(args(tmp_path, env_id="hopper-random", num_steps=500))
    ds = minari.load_dataset("mujoco/hopper/random-v0")
    assert ds.total_steps == 500 and ds.total_episodes > 5  # random hopper falls within tens of steps
    check_episodes(ds, 11, 3)
    assert any(ep.terminations[-1] for ep in ds.iterate_episodes())
    actions = np.concatenate([ep.actions for ep in ds.iterate_episodes()])
    assert actions.min() < -0.9 and actions.max() > 0.9 and abs(actions.mean()) < 0.1  # uniform on [-1, 1]
    meta = ds.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(-20.272305) and meta["ref_max_score"] == pytest.approx(3234.3)
    assert meta["algorithm_name"] == "uniform random actions"
    assert json.loads(meta["description"])["args"]["num_steps"] == 500
    env = ds.recover_environment(eval_env=True)
    assert env.spec.id == "Hopper-v5" and env.observation_space.shape == (11,)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    # the shared loader finds it by short name, from the local store
    assert cd.load_dataset("hopper-random").total_steps == 500
    capsys.readouterr()
    cd.main(args(tmp_path, env_id="hopper-random", info=True))
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    returns = [float(np.sum(ep.rewards)) for ep in ds.iterate_episodes()]
    assert info["steps"] == 500 and info["mean_return"] == pytest.approx(np.mean(returns))
    assert info["mean_normalized_return"] == pytest.approx((np.mean(returns) + 20.272305) / (3234.3 + 20.272305))


def test_sac_levels_share_one_run(minari_store, tmp_path, capsys):
    a = args(tmp_path, env_id="hopper-medium-replay", **TINY_SAC)
    cd.main(a)
    replay = minari.load_dataset("mujoco/hopper/medium-replay-v0")
    assert replay.total_steps == 300  # the whole replay buffer up to the medium point
    check_episodes(replay, 11, 3)
    meta = replay.storage.metadata
    assert json.loads(meta["description"])["policy"]["step"] == 300
    medium_point = tmp_path / "work" / "hopper" / "medium_point.pt"
    mtime = medium_point.stat().st_mtime_ns

    capsys.readouterr()
    cd.main(args(tmp_path, env_id="hopper-medium", num_steps=250, **TINY_SAC))
    assert "using the cached medium point" in capsys.readouterr().out  # no retraining
    assert medium_point.stat().st_mtime_ns == mtime
    medium = minari.load_dataset("mujoco/hopper/medium-v0")
    assert medium.total_steps == 250
    check_episodes(medium, 11, 3)

    # medium-expert builds the expert level as a side effect (SAC resumes from its checkpoint) and concatenates
    cd.main(args(tmp_path, env_id="hopper-medium-expert", num_steps=250, **TINY_SAC))
    expert = minari.load_dataset("mujoco/hopper/expert-v0")
    mixed = minari.load_dataset("mujoco/hopper/medium-expert-v0")
    assert json.loads(expert.storage.metadata["description"])["policy"]["step"] == 400
    assert mixed.total_steps == 500 and mixed.total_episodes == medium.total_episodes + expert.total_episodes
    check_episodes(mixed, 11, 3)
    first = next(mixed.iterate_episodes())
    np.testing.assert_allclose(first.actions, next(medium.iterate_episodes()).actions)

    # the saved behaviour policies rebuild as documented, and act in [-1, 1]
    for level, step in (("medium", 300), ("expert", 400)):
        ckpt = torch.load(tmp_path / "policies" / f"hopper-{level}.pt", weights_only=False)
        assert ckpt["kind"] == "sac_tanh_gaussian" and ckpt["hidden"] == [256, 256] and ckpt["step"] == step
        actor = cd.Actor(ckpt["obs_dim"], ckpt["act_dim"], ckpt["hidden"])
        actor.load_state_dict(ckpt["state_dict"])
        mean, _ = actor(torch.zeros(1, 11))
        det = cd.NumpyActor(ckpt["state_dict"], np.random.default_rng(0), deterministic=True)(np.zeros(11))
        np.testing.assert_allclose(det, torch.tanh(mean)[0].detach().numpy(), atol=1e-5)
        assert isinstance(ckpt["return"], float)


def test_sac_resumes_from_checkpoint(minari_store, tmp_path, capsys):
    a = args(tmp_path, env_id="hopper-medium", num_steps=50, **{**TINY_SAC, "medium_max_steps": 200})
    cd.train_sac(a, "hopper", "medium")
    state = torch.load(tmp_path / "work" / "hopper" / "sac_state.pt", weights_only=False)
    assert state["step"] == 200 and len(state["buffer"]["obs"]) == 200
    capsys.readouterr()
    point = cd.train_sac(args(tmp_path, **{**TINY_SAC, "medium_max_steps": 200}), "hopper", "expert")
    assert "resumed the SAC run at step 200" in capsys.readouterr().out
    assert point["step"] == 400


def test_maze_collector_reaches_goals(minari_store, tmp_path):
    cd.main(args(tmp_path, env_id="maze2d-umaze", num_steps=1500, maze_episode_len=500))
    ds = minari.load_dataset("D4RL/pointmaze/umaze-v2")
    assert ds.total_steps == 1500 and ds.total_episodes == 3
    check_episodes(ds, 4, 2)
    ep = next(ds.iterate_episodes())
    assert set(ep.observations) == {"observation", "achieved_goal", "desired_goal"}
    goals = sum(int(np.sum(np.diff(e.infos["success"].astype(int)) == 1)) for e in ds.iterate_episodes())
    assert goals >= 3, "the waypoint controller should reach several goals in 1500 steps"
    assert len({tuple(np.round(g, 3)) for g in ep.observations["desired_goal"]}) > 1, "goals must be renewed"
    meta = ds.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(23.85) and meta["ref_max_score"] == pytest.approx(161.86)
    env = ds.recover_environment(eval_env=True)
    assert env.spec.id == "PointMaze_UMaze-v3" and env.spec.max_episode_steps == 300


def test_bad_id_is_a_clear_error(minari_store):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "collect_datasets.py"), "--env-id", "hopper-mediocre"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "error: unknown --env-id 'hopper-mediocre'" in r.stderr and "hopper-medium-replay" in r.stderr
    assert "Traceback" not in r.stderr


def test_load_dataset_errors(minari_store, monkeypatch):
    with pytest.raises(SystemExit, match="unknown --env-id"):
        cd.load_dataset("hopper-mediocre")

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(minari.storage.hosting, "download_dataset", offline)
    with pytest.raises(SystemExit, match="collect_datasets.py --env-id walker2d-random"):
        cd.load_dataset("walker2d-random")


def test_interrupted_write_leaves_nothing(minari_store, tmp_path, monkeypatch):
    from minari.dataset._storages.hdf5_storage import HDF5Storage
    original = HDF5Storage.update_episodes

    def half_then_interrupt(self, episodes):
        original(self, list(episodes)[:2])  # some episodes really are on disk when the interrupt comes
        raise KeyboardInterrupt
    monkeypatch.setattr(HDF5Storage, "update_episodes", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cd.main(args(tmp_path, env_id="hopper-random", num_steps=300))
    assert not (minari_store / "mujoco" / "hopper" / "random-v0").exists()
    assert not [p for p in minari_store.iterdir() if p.name.startswith(".tmp")], "temporary root left behind"
    assert "mujoco/hopper/random-v0" not in minari.list_local_datasets()
    with pytest.raises(FileNotFoundError):
        minari.load_dataset("mujoco/hopper/random-v0")
    monkeypatch.setattr(HDF5Storage, "update_episodes", original)
    cd.main(args(tmp_path, env_id="hopper-random", num_steps=300))  # and a later run can write it
    assert minari.load_dataset("mujoco/hopper/random-v0").total_steps == 300


def test_refuses_to_overwrite(minari_store, tmp_path):
    cd.main(args(tmp_path, env_id="walker2d-random", num_steps=200))
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        cd.main(args(tmp_path, env_id="walker2d-random", num_steps=300))
    assert minari.load_dataset("mujoco/walker2d/random-v0").total_steps == 200
    cd.main(args(tmp_path, env_id="walker2d-random", num_steps=300, overwrite=True))
    assert minari.load_dataset("mujoco/walker2d/random-v0").total_steps == 300
    assert list(minari.list_local_datasets()) == ["mujoco/walker2d/random-v0"]


def test_lowered_step_cap_cuts_a_resumed_run_at_once(minari_store, tmp_path, capsys):
    cd.train_sac(args(tmp_path, **{**TINY_SAC, "medium_max_steps": 200}), "hopper", "medium")
    (tmp_path / "work" / "hopper" / "medium_point.pt").unlink()  # as if killed after the step-200 checkpoint
    point = cd.train_sac(args(tmp_path, **{**TINY_SAC, "medium_max_steps": 150}), "hopper", "medium")
    assert point["step"] == 200 and point["cut"] == "step cap" and len(point["replay"]["obs"]) == 200
    assert "resumed the SAC run at step 200" in capsys.readouterr().out
