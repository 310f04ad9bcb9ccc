"""Bad inputs end in one clear line: broken local datasets, garbage checkpoints of pets_baseline.py, collect_datasets.py's
numeric flags and unwritable folders, a diverging agent (results.json marked failed) and interrupts (nothing
half-written)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import collect_datasets as cd
import pets_baseline
import pgd_td3bc
from conftest import assert_invalid_value_gives_one_line, write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--env-id", "hopper-medium-replay", "--horizon", "8", "--diffuser-channels", "16", "--diffuser-mults", "1", "2",
        "--diffuser-steps", "60", "--sampler-steps", "4", "--total-steps", "200", "--num-synthetic", "500",
        "--regenerate-every", "100", "--eval-every", "100", "--eval-episodes", "1", "--log-every", "50"]


def one_line(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.strip().splitlines() if line.startswith("error") or line.startswith("interr")]
    assert len(lines) == 1, p.stderr[-3000:]
    return lines[0]


def run(script, flags, store, timeout=600, **kw):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(store), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def tiny_store(minari_store):
    rng = np.random.default_rng(0)
    write_tiny_dataset("mujoco/hopper/medium-replay-v0", "Hopper-v5", 600, 50,
                       lambda d: np.clip(rng.normal(0, 0.3, d), -1, 1), rng, (-20.272305, 3234.3))
    return minari_store


@pytest.mark.parametrize("damage", ["truncate", "garble", "no data", "no metadata"])
def test_broken_local_dataset_is_one_line_everywhere(tiny_store, tmp_path, damage, capsys):
    folder = tiny_store / "mujoco" / "hopper" / "medium-replay-v0"
    data = folder / "data" / "main_data.hdf5"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "garble":
        raw = bytearray(data.read_bytes())
        raw[2000:6000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        data.write_bytes(bytes(raw))
    elif damage == "no data":
        shutil.rmtree(folder / "data")
        (folder / "data").mkdir()
    else:
        (folder / "data" / "metadata.json").unlink()
    expected = "delete that folder and rebuild it with: python collect_datasets.py --env-id hopper-medium-replay"
    # an agent script, end to end: one line, and no run dir left behind
    line = one_line(run("pgd_td3bc.py", TINY + ["--runs-root", str(tmp_path / "runs")], tiny_store))
    assert "unreadable" in line and str(folder) in line and expected in line
    assert not (tmp_path / "runs").exists()
    # pets_baseline.py and collect_datasets.py --info read it through the same shared code
    for call in (lambda: pets_baseline.episodes_from_minari(pets_baseline.load_dataset("hopper-medium-replay")),
                 lambda: cd.main(cd.Args(env_id="hopper-medium-replay", info=True))):
        with pytest.raises(SystemExit) as e:
            call()
        assert "unreadable" in str(e.value.code) and expected in str(e.value.code)


def test_pets_garbage_checkpoints_are_one_line(tiny_store, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(3000))
    with pytest.raises(SystemExit, match="is not a readable policy checkpoint"):
        pets_baseline.load_policy(str(garbage), torch.device("cpu"))
    torch.save({"kind": "iql_gaussian"}, tmp_path / "partial.pt")  # readable, but not a whole policy
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {"ensemble_size": 2}}, foreign)
    policy = tmp_path / "policy.pt"
    agent = pgd_td3bc.make_agent(pgd_td3bc.Args(hidden_dim=8), 3, dict(obs_mean=torch.zeros(11), obs_std=torch.ones(11)))
    torch.save(agent.policy_checkpoint(), policy)
    for bad in (garbage, foreign):
        p = run("pets_baseline.py", ["--env-id", "hopper-medium-replay", "--policy-checkpoints", str(policy),
                                     "--dynamics-checkpoint", str(bad), "--runs-root", str(tmp_path / "runs"),
                                     "--num-trajectories", "4"], tiny_store)
        assert "--dynamics-checkpoint" in one_line(p) and "not a dynamics model" in one_line(p)


def test_collect_flags_and_folders_are_one_line(minari_store, tmp_path):
    for flags, message in ((["--num-steps", "0"], "--num-steps 0 is outside"),
                           (["--num-steps", "-1"], "--num-steps -1 is outside"),
                           (["--env-id", "maze2d-umaze", "--maze-episode-len", "0"], "--maze-episode-len 0"),
                           (["--work-dir", "/proc/no/such"], "--work-dir /proc/no/such is not writable")):
        p = run("collect_datasets.py", ["--env-id", "hopper-random", *flags], minari_store, timeout=120)
        assert message in one_line(p)
    p = run("collect_datasets.py", ["--env-id", "hopper-random", "--num-steps", "10"], "/proc/no/store", timeout=120)
    assert "the Minari store /proc/no/store cannot be created" in one_line(p)
    assert minari_store.exists() and not list(minari_store.iterdir())  # nothing was written anywhere


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_invalid_collect_flag_gives_one_line(data):
    assert_invalid_value_gives_one_line(cd, cd.RANGES, data.draw, st)


def test_valid_collect_defaults_pass_validation():
    cd.check_ranges(cd.Args(num_steps=1, maze_episode_len=1, learning_starts=0), cd.RANGES)


def test_diverging_agent_stops_with_one_line_and_a_failed_results_json(tiny_store, tmp_path):
    flags = TINY + ["--synthetic-ratio", "0", "--learning-rate", "1e30", "--log-every", "10", "--runs-root",
                    str(tmp_path / "runs")]
    line = one_line(run("pgd_td3bc.py", flags, tiny_store))
    assert "agent loss" in line and "at step" in line and "lower --learning-rate" in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and res["error"] == line


def test_interrupt_during_diffuser_training_marks_the_run_and_writes_no_cache(tiny_store, tmp_path):
    flags = TINY + ["--diffuser-steps", "100000", "--runs-root", str(tmp_path / "runs"), "--diffuser-cache-dir",
                    str(tmp_path / "cache")]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(tiny_store), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "pgd_td3bc.py"), *flags], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/events.out.tfevents*")):
        time.sleep(0.1)
    time.sleep(3)  # inside the diffuser's training loop
    p.send_signal(signal.SIGTERM)  # (SIGINT would do the same, but a shell that starts jobs in the background ignores it)
    out, err = p.communicate(timeout=120)
    result = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    assert "interrupted: run dir" in one_line(result)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("module_name, args_class", [("compare", "Args"), ("sweep", "Args"), ("bench", "BenchArgs")])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_invalid_report_and_bench_flag_gives_one_line(module_name, args_class, data):
    import dataclasses
    import importlib

    from conftest import invalid_value
    module = importlib.import_module(module_name)
    cls = getattr(module, args_class)
    name, value = invalid_value(data.draw, st, cls(), module.RANGES)
    with pytest.raises(SystemExit) as e:  # main() validates before it runs, writes or imports anything
        module.main(dataclasses.replace(cls(), **{name: value}))
    assert str(e.value.code).startswith(f"error: --{name.replace('_', '-')} ") and "\n" not in str(e.value.code)


def test_sigterm_during_collection_keeps_the_sac_checkpoint_and_writes_no_dataset(minari_store, tmp_path):
    flags = ["--env-id", "hopper-medium", "--work-dir", str(tmp_path / "work"), "--policy-dir", str(tmp_path / "pol"),
             "--learning-starts", "100", "--checkpoint-freq", "200", "--eval-freq", "100000", "--medium-max-steps",
             "100000", "--log-freq", "100000"]
    env = {**os.environ, "MINARI_DATASETS_PATH": str(minari_store), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "collect_datasets.py"), *flags], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "work" / "hopper" / "sac_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists():
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    line = one_line(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    assert line.startswith("interrupted: nothing was written under mujoco/hopper/medium-v0") and "resumes" in line
    assert torch.load(state, weights_only=False)["step"] >= 200  # the resumable SAC state is kept
    assert not list(minari_store.rglob("*.hdf5")) and not [d for d in minari_store.iterdir() if d.name.startswith(".tmp")]
