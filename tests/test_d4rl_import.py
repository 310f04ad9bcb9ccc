"""D4RL v2/v1 import (collect_datasets.py): small hdf5 files in D4RL's exact layout, imported into a temporary Minari
store and checked; downloads only from a loopback HTTP server or a file:// URL."""
import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest

import collect_datasets as cd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hopper_rows(n_episodes=(7, 5, 9), partial=4, seed=0):
    """Real Hopper-v5 rows in D4RL's flat layout: episodes of (at most) the given lengths, each ending by falling over
    (terminal) or by a timeout, then `partial` rows with no flag (an interrupted episode)."""
    env, rng = gym.make("Hopper-v5"), np.random.default_rng(seed)
    rows = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for i, length in enumerate(list(n_episodes) + [partial]):
        obs, _ = env.reset(seed=seed + i)
        for t in range(length):
            act = rng.uniform(-1, 1, 3).astype(np.float32)
            nxt, r, term, _, _ = env.step(act)
            last = t == length - 1
            for k, v in zip(rows, (obs, act, r, term, last and i < len(n_episodes) and not term, nxt)):
                rows[k].append(v)
            obs = nxt
            if term:
                break
    return {k: np.asarray(v) for k, v in rows.items()}


def write_d4rl(path, rows: dict, next_obs=True, timeouts=True, goals=None):
    """An hdf5 file as D4RL ships them: float32 arrays, bool flags, `infos/*` and `metadata/*` groups."""
    with h5py.File(path, "w") as f:
        f["observations"] = rows["observations"].astype(np.float32)
        f["actions"] = rows["actions"].astype(np.float32)
        f["rewards"] = rows["rewards"].astype(np.float32)
        f["terminals"] = rows["terminals"].astype(bool)
        if timeouts:
            f["timeouts"] = rows["timeouts"].astype(bool)
        if next_obs:
            f["next_observations"] = rows["next_observations"].astype(np.float32)
        f["infos/qpos"] = np.zeros((len(rows["actions"]), 2), np.float32)
        if goals is not None:
            f["infos/goal"] = goals.astype(np.float32)
        f["metadata/algorithm"] = "test"
    return str(path)


def args(tmp_path, **kw):
    return cd.Args(**{"work_dir": str(tmp_path / "work"), "policy_dir": str(tmp_path / "policies"), **kw})


@pytest.mark.parametrize("next_obs", [True, False], ids=["with-next_observations", "without"])
def test_hopper_import_splits_like_d4rl(minari_store, tmp_path, next_obs):
    rows = hopper_rows()
    path = write_d4rl(tmp_path / "hopper_medium_replay-v2.hdf5", rows, next_obs=next_obs)
    cd.main(args(tmp_path, env_id="hopper-medium-replay-v2", d4rl_file=path))
    ds = minari.load_dataset("D4RL/hopper/medium-replay-v2")
    eps = list(ds.iterate_episodes())
    n_rows = len(rows["actions"])
    ends = np.flatnonzero(rows["terminals"] | rows["timeouts"])
    starts = np.concatenate([[0], ends + 1])
    assert len(eps) == len(ends) + 1  # the trailing partial episode is kept
    flag = [("terminal" if rows["terminals"][e] else "timeout") for e in ends] + ["partial"]
    for ep, s, e, how in zip(eps, starts, list(ends) + [n_rows - 1], flag):
        kept = e - s + 1 if next_obs or how == "terminal" else e - s  # no successor known: last row dropped
        assert len(ep.actions) == kept
        assert ep.terminations[-1] == (how == "terminal") and ep.truncations[-1] == (how != "terminal")
        assert not (ep.terminations[:-1] | ep.truncations[:-1]).any()
        np.testing.assert_allclose(ep.observations[:-1], rows["observations"][s:s + kept], atol=1e-6)
        np.testing.assert_allclose(ep.actions, rows["actions"][s:s + kept], atol=1e-6)
        np.testing.assert_allclose(ep.rewards, rows["rewards"][s:s + kept], rtol=1e-6)
        if next_obs or how != "terminal":  # s' continuity: each stored successor is the file's true s'
            np.testing.assert_allclose(ep.observations[1:], rows["next_observations"][s:s + kept], atol=1e-6)
    meta = ds.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(-20.272305) and meta["ref_max_score"] == pytest.approx(3234.3)
    split = json.loads(meta["description"])["split"]
    assert split["trailing_partial_episode"] and split["next_observation_mismatches"] == 0
    env = ds.recover_environment(eval_env=True)
    assert env.spec.id == "Hopper-v5" and env.observation_space.shape == ds.observation_space.shape == (11,)
    env.reset(seed=0)
    env.step(env.action_space.sample())
    # every script finds it by D4RL's name; the SAC-built id is untouched
    assert cd.load_dataset("hopper-medium-replay-v2").total_steps == ds.total_steps
    assert "mujoco/hopper/medium-replay-v0" not in minari.list_local_datasets()


def test_info_prints_episodes_transitions_and_normalized_return(minari_store, tmp_path, capsys):
    rows = hopper_rows((6, 8), partial=0)
    cd.main(args(tmp_path, env_id="hopper-medium-v2", d4rl_file=write_d4rl(tmp_path / "f.hdf5", rows)))
    capsys.readouterr()
    cd.main(args(tmp_path, env_id="hopper-medium-v2", info=True))
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ends = np.flatnonzero(rows["terminals"] | rows["timeouts"])
    returns = [rows["rewards"][s:e + 1].sum() for s, e in zip(np.concatenate([[0], ends[:-1] + 1]), ends)]
    assert info["episodes"] == 2 and info["steps"] == len(rows["actions"]) and info["source"] == "D4RL"
    assert info["mean_normalized_return"] == pytest.approx((np.mean(returns) + 20.272305) / (3234.3 + 20.272305),
                                                           rel=1e-5)


def maze_rows(n=60, seed=0):
    """A PointMaze_UMaze-v3 run (waypoint controller) written back in D4RL's maze2d frame; returns the D4RL-frame
    rows, the goals, and the gymnasium-frame observations/actions they came from."""
    import gymnasium_robotics
    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_UMaze-v3", continuing_task=True, reset_target=False, max_episode_steps=n)
    controller = cd.WaypointController(env.unwrapped.maze)
    obs, _ = env.reset(seed=seed)
    gym_obs, gym_act = [obs["observation"]], []
    for _ in range(n):
        act = controller(obs)
        obs, *_ = env.step(act)
        gym_obs.append(obs["observation"]), gym_act.append(act)
    gym_obs, gym_act, goal = np.array(gym_obs), np.array(gym_act), obs["desired_goal"].copy()

    def to_d4rl(xy):  # the inverse of the importer's rotation and shift, written out for the 5x5 UMaze
        return np.stack([2 - xy[..., 1] - 0.2, xy[..., 0] + 2 - 0.2], -1)
    d4rl_obs = np.concatenate([to_d4rl(gym_obs[:, :2]), np.stack([-gym_obs[:, 3], gym_obs[:, 2]], -1)], 1)
    rows = dict(observations=d4rl_obs[:-1], actions=np.stack([-gym_act[:, 1], gym_act[:, 0]], -1),
                rewards=np.zeros(n), terminals=np.zeros(n, bool), timeouts=np.zeros(n, bool))
    rows["timeouts"][29] = True
    return rows, np.repeat(to_d4rl(goal)[None], n, 0), gym_obs, gym_act, goal


def test_maze2d_import_goals_frame_and_dynamics(minari_store, tmp_path):
    rows, goals, gym_obs, gym_act, gym_goal = maze_rows()
    path = write_d4rl(tmp_path / "maze2d-umaze-sparse-v1.hdf5", rows, next_obs=False, goals=goals)
    cd.main(args(tmp_path, env_id="maze2d-umaze-v1", d4rl_file=path))
    ds = minari.load_dataset("D4RL/maze2d/umaze-v1")
    first, second = list(ds.iterate_episodes())
    assert len(first.actions) == 29 and first.truncations[-1]  # the timeout row's transition is dropped
    assert len(second.actions) == 29 and second.truncations[-1]  # and so is the trailing partial's last row
    assert set(first.observations) == {"achieved_goal", "desired_goal", "observation"}
    np.testing.assert_allclose(first.observations["observation"], gym_obs[:30], atol=1e-5)  # back in gym's frame
    np.testing.assert_allclose(first.actions, gym_act[:29], atol=1e-6)
    np.testing.assert_allclose(first.observations["achieved_goal"], gym_obs[:30, :2], atol=1e-5)
    np.testing.assert_allclose(first.observations["desired_goal"], np.repeat(gym_goal[None], 30, 0), atol=1e-5)
    # the imported transitions are the eval env's own dynamics
    env = ds.recover_environment(eval_env=True)
    assert env.spec.max_episode_steps == 300 and env.observation_space["observation"].shape == (4,)
    env.reset(seed=0)
    u = env.unwrapped
    for t in (0, 10, 20):
        u.point_env.set_state(first.observations["observation"][t, :2], first.observations["observation"][t, 2:])
        o, *_ = env.step(first.actions[t])
        np.testing.assert_allclose(o["observation"], first.observations["observation"][t + 1], atol=1e-6)
    # D4RL's frame convention: qpos = (row, col) of a cell lands in that free cell; D4RL's goal cell is the eval goal
    maze = u.maze
    for cell in [(1, 1), (1, 3), (2, 3), (3, 1)]:
        xy = cd.d4rl_maze_to_gym("umaze", np.array(cell, float))
        assert tuple(maze.cell_xy_to_rowcol(xy)) == cell
    obs, _ = env.reset(seed=1)
    assert tuple(maze.cell_xy_to_rowcol(obs["desired_goal"])) == cd.D4RL_MAZE_GOAL["umaze"]


def test_missing_file_is_one_line_naming_the_three_ways(minari_store, tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "collect_datasets.py"), "--env-id", "walker2d-medium-v2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "walker2d_medium-v2.hdf5" in line and str(tmp_path / "d4rl") in line
    assert "--d4rl-file" in line and "--download" in line and "gym_mujoco_v2/walker2d_medium-v2.hdf5" in line
    # every other script: the same name, one line pointing at the import
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pgd_td3bc.py"), "--env-id", "walker2d-medium-v2",
                        "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "python collect_datasets.py --env-id walker2d-medium-v2" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_corrupt_and_wrong_files_are_one_line(minari_store, tmp_path):
    garbage = tmp_path / "garbage.hdf5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(SystemExit, match="cannot read .* as a D4RL hdf5 file"):
        cd.main(args(tmp_path, env_id="hopper-medium-v2", d4rl_file=str(garbage)))
    rows = hopper_rows((5,), partial=0)
    wrong = write_d4rl(tmp_path / "wrong.hdf5", rows)
    with pytest.raises(SystemExit, match=r"observations has shape \(5, 11\), expected \(5, 17\)"):
        cd.main(args(tmp_path, env_id="halfcheetah-medium-v2", d4rl_file=wrong))
    rows["rewards"][2] = np.nan
    nan = write_d4rl(tmp_path / "nan.hdf5", rows)
    with pytest.raises(SystemExit, match="rewards has NaN"):
        cd.main(args(tmp_path, env_id="hopper-medium-v2", d4rl_file=nan))
    with pytest.raises(SystemExit, match="no infos/goal"):
        cd.main(args(tmp_path, env_id="maze2d-umaze-v1", d4rl_file=wrong))
    assert minari.list_local_datasets() == {}


def test_interrupted_import_leaves_nothing_and_overwrite_is_refused(minari_store, tmp_path, monkeypatch):
    path = write_d4rl(tmp_path / "f.hdf5", hopper_rows())
    from minari.dataset._storages.hdf5_storage import HDF5Storage
    original = HDF5Storage.update_episodes

    def half_then_interrupt(self, episodes):
        original(self, list(episodes)[:2])
        raise KeyboardInterrupt
    monkeypatch.setattr(HDF5Storage, "update_episodes", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        cd.main(args(tmp_path, env_id="hopper-expert-v2", d4rl_file=path))
    assert "D4RL/hopper/expert-v2" not in minari.list_local_datasets()
    assert not [p for p in minari_store.iterdir() if p.name.startswith(".tmp")]
    monkeypatch.setattr(HDF5Storage, "update_episodes", original)
    cd.main(args(tmp_path, env_id="hopper-expert-v2", d4rl_file=path))
    with pytest.raises(SystemExit, match="already exists.*--overwrite"):
        cd.main(args(tmp_path, env_id="hopper-expert-v2", d4rl_file=path))
    cd.main(args(tmp_path, env_id="hopper-expert-v2", d4rl_file=path, overwrite=True))


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A loopback file server that honours `Range: bytes=N-` and can cut the first response short."""
    cut_after = None  # bytes of the first response before the connection drops

    def log_message(self, *a):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        data = open(path, "rb").read()
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if RangeHandler.cut_after is not None:
            body, RangeHandler.cut_after = body[:RangeHandler.cut_after], None
        self.wfile.write(body)


@pytest.fixture
def loopback(tmp_path):
    served = tmp_path / "served"
    (served / "gym_mujoco_v2").mkdir(parents=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(RangeHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_resumes_from_a_loopback_server(minari_store, tmp_path, loopback, monkeypatch, capsys):
    served, url = loopback
    source = write_d4rl(served / "gym_mujoco_v2" / "hopper_random-v2.hdf5", hopper_rows())
    d4rl_dir = tmp_path / "d4rl"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl_dir))
    RangeHandler.cut_after = 3000  # the first try breaks off: an incomplete .part file, no dataset
    with pytest.raises(SystemExit, match="stopped at 3000 of .* run the same command again"):
        cd.main(args(tmp_path, env_id="hopper-random-v2", download=True, d4rl_base_url=url))
    assert (d4rl_dir / "hopper_random-v2.hdf5.part").stat().st_size == 3000
    assert not (d4rl_dir / "hopper_random-v2.hdf5").exists() and minari.list_local_datasets() == {}
    cd.main(args(tmp_path, env_id="hopper-random-v2", download=True, d4rl_base_url=url))  # continues at byte 3000
    assert (d4rl_dir / "hopper_random-v2.hdf5").read_bytes() == open(source, "rb").read()
    assert not (d4rl_dir / "hopper_random-v2.hdf5.part").exists()
    assert minari.load_dataset("D4RL/hopper/random-v2").total_episodes == 4
    # a file:// URL works the same; a server without the file gives one line
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl2"))
    cd.main(args(tmp_path, env_id="hopper-random-v2", download=True, overwrite=True,
                 d4rl_base_url=(served).as_uri()))
    assert (tmp_path / "d4rl2" / "hopper_random-v2.hdf5").exists()
    with pytest.raises(SystemExit, match="downloading .*walker2d_random-v2.hdf5 failed .*404"):
        cd.main(args(tmp_path, env_id="walker2d-random-v2", download=True, d4rl_base_url=url))


def test_minari_remote_path_is_installed_and_fails_in_one_line(minari_store, monkeypatch):
    import huggingface_hub  # noqa: F401  (the `minari[hf]` extra: Minari's remote store needs it)
    from minari.storage.remotes import get_cloud_storage
    assert type(get_cloud_storage()).__name__ == "HuggingFaceStorage"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = subprocess.run([sys.executable, "-c", "import collect_datasets as cd; cd.load_dataset('halfcheetah-medium')"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert "mujoco/halfcheetah/medium-v0" in line and "could not be downloaded" in line
    assert "collect_datasets.py --env-id halfcheetah-medium" in line


def test_tiny_pgd_run_on_an_imported_set(minari_store, tmp_path):
    rows = hopper_rows((60,) * 25, partial=0)
    cd.main(args(tmp_path, env_id="hopper-medium-v2", d4rl_file=write_d4rl(tmp_path / "f.hdf5", rows)))
    cmd = [sys.executable, os.path.join(ROOT, "pgd_td3bc.py"), "--env-id", "hopper-medium-v2", "--horizon", "8",
           "--diffuser-channels", "16", "--diffuser-mults", "1", "2", "--diffuser-steps", "50", "--sampler-steps", "4",
           "--total-steps", "100", "--num-synthetic", "500", "--regenerate-every", "100", "--eval-every", "100",
           "--eval-episodes", "1", "--runs-root", str(tmp_path / "runs"), "--diffuser-cache-dir", str(tmp_path / "d")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["args"]["env_id"] == "hopper-medium-v2" and np.isfinite(res["last_score"])
