"""tools/probe_td3bc_critic.py: the critic probe of issue #12's TD3+BC mechanism (unit numbers on a built agent, the
CLI on a tiny trained run, one-line errors)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import pgd_td3bc  # noqa: E402
import probe_td3bc_critic as probe_tool  # noqa: E402

PROBE = os.path.join(ROOT, "tools", "probe_td3bc_critic.py")


def built_agent(obs_dim=5, act_dim=3):
    torch.manual_seed(0)
    args = pgd_td3bc.preset_args(hidden_dim=32)
    stats = dict(obs_mean=torch.randn(obs_dim), obs_std=torch.rand(obs_dim) + 0.5)
    return pgd_td3bc.make_agent(args, act_dim, stats)


def run_probe(agent, obs, actions):
    return probe_tool.probe(agent, obs, actions, 0.3, torch.Generator().manual_seed(0))


def test_probe_numbers_on_a_built_agent():
    agent = built_agent()
    obs, actions = torch.randn(256, 5), torch.rand(256, 3) * 2 - 1
    base = run_probe(agent, obs, actions)
    assert set(base) == set(probe_tool.METRICS)
    # the Q term's pull: alpha / mean |Q1| times the mean norm of grad_a Q1, checked by central differences
    with torch.no_grad():
        pi, s = agent.act(obs), agent.norm(obs)
        q = lambda a: agent.q1(torch.cat([s, a], -1)).squeeze(-1).double()  # noqa: E731
        h = 1e-2
        grad = torch.stack([(q(pi + h * e) - q(pi - h * e)) / (2 * h) for e in torch.eye(3)], -1)
        expected = agent.alpha / q(pi).abs().mean() * grad.norm(dim=-1).mean()
    assert base["q_pull"] == pytest.approx(float(expected), rel=1e-2)
    # ... which does not change when the critic's scale does (lambda normalises it away), as in TD3+BC's actor loss
    with torch.no_grad():
        agent.q1[-1].weight.mul_(10), agent.q1[-1].bias.mul_(10)
    assert run_probe(agent, obs, actions)["q_pull"] == pytest.approx(base["q_pull"], rel=1e-4)
    # twins: identical critics agree exactly; different ones do not
    assert base["twin_cos"] < 0.99 and base["twin_gap_pi"] > 0 and base["twin_gap_off"] > 0
    agent.q2.load_state_dict(agent.q1.state_dict())
    same = run_probe(agent, obs, actions)
    assert same["twin_cos"] == pytest.approx(1.0, abs=1e-5) and same["twin_gap_pi"] == same["twin_gap_off"] == 0
    # the data-distance and BC pull vanish when the data's actions are the policy's; they grow with the distance
    on_policy = run_probe(agent, obs, agent.act(obs).detach())
    assert on_policy["pi_data_sq"] == pytest.approx(0, abs=1e-10) and on_policy["bc_pull_real"] == pytest.approx(0, abs=1e-6)
    shifted = run_probe(agent, obs, agent.act(obs).detach() + 0.1)
    assert shifted["pi_data_sq"] == pytest.approx(3 * 0.01, rel=1e-4)
    assert shifted["bc_pull_real"] == pytest.approx(2 * (3 * 0.01) ** 0.5 / 3, rel=1e-4)
    # q_drop_off: Q's peak at the policy's action; zero for a critic blind to actions
    with torch.no_grad():
        agent.q1[0].weight[:, 5:] = 0
    blind = run_probe(agent, obs, actions)
    assert blind["q_drop_off"] == pytest.approx(0, abs=1e-6) and blind["q_pull"] == pytest.approx(0, abs=1e-8)
    assert 0 <= base["saturated"] <= 1
    # on a synthetic set: zero when its actions are the policy's, the squared distance and BC pull when shifted
    synth = dict(obs=obs, actions=agent.act(obs).detach())
    assert probe_tool.probe_synthetic(agent, synth, 100) == {"pi_synth_sq": 0.0, "bc_pull_synth": 0.0}
    shifted = probe_tool.probe_synthetic(agent, dict(obs=obs, actions=synth["actions"] - 0.2), 100)
    assert shifted["pi_synth_sq"] == pytest.approx(3 * 0.04, rel=1e-4)
    assert shifted["bc_pull_synth"] == pytest.approx(2 * (3 * 0.04) ** 0.5 / 3, rel=1e-4)


def cli(*args):
    return subprocess.run([sys.executable, PROBE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_probe_reads_a_run_checkpoint_with_its_synthetic_set(tiny_store, tmp_path, monkeypatch):
    """A checkpoint.pt as --checkpoint-every writes it (the last one, at step 100 of 200, kept here: the run's final
    removal is skipped), probed as a file: its step, score and synthetic-set columns."""
    from test_pgd import TINY
    real_remove = os.remove
    monkeypatch.setattr(os, "remove", lambda p: None if str(p).endswith("checkpoint.pt") else real_remove(p))
    pgd_td3bc.main(pgd_td3bc.parse_args(TINY + ["--checkpoint-every", "100", "--runs-root", str(tmp_path / "runs"),
                                                "--diffuser-cache-dir", str(tmp_path / "diffusers")]))
    (ckpt,) = (tmp_path / "runs").glob("*/checkpoint.pt")
    agent, info = probe_tool.load_run(str(ckpt))
    assert info["step"] == 100 and info["env_id"] == "hopper-medium-replay" and len(info["synthetic"]["obs"]) == 1000
    run_results = json.loads((ckpt.parent / "results.json").read_text())
    assert info["last_score"] == run_results["history"][0]["score_mean"]  # the score at the checkpoint's step
    assert torch.equal(agent.actor[0].weight, torch.load(ckpt)["agent"]["actor.0.weight"])
    out = tmp_path / "probe.json"
    p = cli(str(ckpt), "--states", "200", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(out.read_text())["runs"]
    assert row["step"] == 100 and row["pi_synth_sq"] > 0 and "pi_synth_sq" in p.stdout and "step 100" in p.stdout
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    bad = cli(str(tmp_path / "bad.pt"))
    assert bad.returncode != 0 and "cannot read the run checkpoint" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_probe_cli_on_a_tiny_trained_run(tiny_store, tmp_path):
    env = {**os.environ, "MINARI_DATASETS_PATH": tiny_store}
    train = subprocess.run([sys.executable, os.path.join(ROOT, "pgd_td3bc.py"), "--env-id", "hopper-medium-replay",
                            "--synthetic-ratio", "0", "--total-steps", "100", "--eval-every", "100",
                            "--eval-episodes", "1", "--log-every", "50", "--save-model",
                            "--runs-root", str(tmp_path / "runs")], env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "probe.json"
    p = cli(str(run), str(run), "--names", "a", "b", "--states", "300", "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "| a |" in p.stdout and "| b |" in p.stdout
    rows = json.loads(out.read_text())
    assert rows["states"] == 300 and [r["name"] for r in rows["runs"]] == ["a", "b"]
    assert rows["runs"][0] == {**rows["runs"][1], "name": "a"}  # the same run probed twice gives the same numbers
    assert rows["runs"][0]["step"] == 100 and "pi_synth_sq" not in rows["runs"][0]  # a run dir keeps no synthetic set
    # bad inputs: one line, non-zero exit, nothing written
    (tmp_path / "iql").mkdir()
    (tmp_path / "iql" / "results.json").write_text(json.dumps({"args": {"expectile": 0.7}, "env_id": "x"}))
    torch.save({"actor.0.weight": torch.zeros(1)}, tmp_path / "iql" / "agent.pt")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "results.json").write_text("{")
    (tmp_path / "corrupt" / "agent.pt").write_bytes(b"garbage")
    for args, words in [([str(tmp_path / "nothing")], "--save-model"), ([str(tmp_path / "iql")], "not of a pgd_td3bc.py run"),
                        ([str(tmp_path / "corrupt")], "cannot read"), ([str(run), "--names", "a", "b"], "one each"),
                        ([str(run), "--states", "0"], "must be positive"),
                        ([str(run), "--out", str(tmp_path / "no" / "dir" / "x.json")], "writable --out")]:
        bad = cli(*args)
        assert bad.returncode != 0 and words in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.stderr)
    assert not (tmp_path / "no").exists()
