"""Shared pytest set-up: the repo root is importable (`import collect_datasets`), and `minari_store` points Minari at
an empty temporary store so no test touches ~/.minari."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    """An empty MINARI_DATASETS_PATH for this test; returns its path."""
    store = tmp_path / "minari_store"
    store.mkdir()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))
    return store


def write_tiny_dataset(dataset_id: str, env_name: str, steps: int, episode_len: int, action_fn, rng, ref_scores):
    """Roll out `action_fn(act_dim)` in `env_name` for about `steps` transitions (episodes capped at `episode_len`) and
    write them as Minari dataset `dataset_id` into the current MINARI_DATASETS_PATH."""
    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    env, buffers, n = gym.make(env_name, max_episode_steps=episode_len), [], 0
    while n < steps:
        obs, _ = env.reset(seed=int(rng.integers(1 << 30)))
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = action_fn(env.action_space.shape[0]).astype(np.float32)
            obs, rew, term, trunc, _ = env.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc and not term)
            if term or trunc:
                break
        n += len(a)
        buffers.append(EpisodeBuffer(observations=np.array(o), actions=np.array(a), rewards=np.array(r),
                                     terminations=np.array(te), truncations=np.array(tr)))
    minari.create_dataset_from_buffers(dataset_id, buffers, env=env, eval_env=env_name, ref_min_score=ref_scores[0],
                                       ref_max_score=ref_scores[1], algorithm_name="test", description="tiny test dataset")


@pytest.fixture(scope="module")
def module_minari_store(tmp_path_factory):
    """An empty temporary MINARI_DATASETS_PATH for the whole module (restored afterwards); yields its path."""
    root = str(tmp_path_factory.mktemp("minari"))
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = root
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH")
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="module")
def tiny_store(module_minari_store):
    """A tiny local `mujoco/hopper/medium-replay-v0` (noisy random policy) in a temporary Minari store."""
    import numpy as np
    rng = np.random.default_rng(0)
    write_tiny_dataset("mujoco/hopper/medium-replay-v0", "Hopper-v5", 1500, 60,
                       lambda d: np.clip(rng.normal(0, 0.3, d), -1, 1), rng, (-20.272305, 3234.3))
    return module_minari_store


def interval_bounds(interval: str):
    """'[1, inf)' -> (1.0, inf, low closed, high closed)."""
    low, high = (float(b) for b in interval[1:-1].split(","))
    return low, high, interval[0] == "[", interval[-1] == "]"


def invalid_value(draw, st, defaults, ranges: dict):
    """(field, value) drawn with hypothesis (`draw`, strategies `st`): a value of the field's type (int, float, or a
    tuple of them) outside the field's valid interval, or NaN for a float field."""
    import math
    name = draw(st.sampled_from(sorted(ranges)))
    low, high, low_closed, high_closed = interval_bounds(ranges[name])
    default = getattr(defaults, name)
    sample = default[0] if isinstance(default, (tuple, list)) and default else default
    is_int = isinstance(sample, int) and not isinstance(sample, bool)
    sides = [side for side, b in (("low", low), ("high", high)) if math.isfinite(b)]
    if not sides or not is_int and draw(st.booleans()):
        value = float("nan")
    else:
        side = draw(st.sampled_from(sides))
        closed = low_closed if side == "low" else high_closed
        gap = draw(st.integers(1 if closed else 0, 10 ** 6))
        value = low - gap if side == "low" else high + gap
        if not is_int:
            value = float(value) - (draw(st.floats(0, 0.999)) if gap else 0.0) * (1 if side == "low" else -1)
    return name, (value,) if isinstance(default, (tuple, list)) else value


def assert_invalid_value_gives_one_line(module, ranges: dict, draw, st):
    """A drawn invalid value of one field of `module.Args` makes `module.check_ranges` stop with one line naming it."""
    import dataclasses
    name, value = invalid_value(draw, st, module.Args(), ranges)
    with pytest.raises(SystemExit) as e:
        module.check_ranges(dataclasses.replace(module.Args(), **{name: value}), ranges)
    message = str(e.value.code)
    assert message.startswith(f"error: --{name.replace('_', '-')} ") and "\n" not in message
