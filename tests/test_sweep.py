"""sweep.py: a tiny grid through submitit's local executor (report cells, skipping finished runs), and the SLURM path's
sbatch parameters checked without a cluster."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import sweep
from conftest import write_tiny_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--horizon", "8", "--diffuser-channels", "16", "--diffuser-mults", "1", "2", "--diffuser-steps", "60",
        "--sampler-steps", "4", "--total-steps", "100", "--num-synthetic", "500", "--regenerate-every", "100",
        "--eval-every", "50", "--eval-episodes", "1", "--log-every", "50"]
GRID = ["--env-ids", "hopper-medium-replay", "--scripts", "pgd_iql.py", "pgd_td3bc.py", "--variants", "real", "guided",
        "--seeds", "1", "2", "--jobs", "2", "--bootstrap-reps", "200"]


@pytest.fixture(scope="module")
def tiny_store(module_minari_store):
    rng = np.random.default_rng(0)
    write_tiny_dataset("mujoco/hopper/medium-replay-v0", "Hopper-v5", 800, 50,
                       lambda d: np.clip(rng.normal(0, 0.3, d), -1, 1), rng, (-20.272305, 3234.3))
    return module_minari_store


def run_sweep(flags, store, check=True):
    env = {**os.environ, "MINARI_DATASETS_PATH": store, "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *flags], env=env, capture_output=True,
                       text=True, timeout=1200)
    if check:
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p


def test_tiny_grid_runs_locally_reports_and_skips_finished_runs(tiny_store, tmp_path):
    root = tmp_path / "sweep"
    flags = GRID + ["--runs-root", str(root), "--", *TINY]
    p = run_sweep(flags, tiny_store)
    assert "0 of 2 diffuser jobs and 0 of 8 agent runs finished already" in p.stdout
    # one diffuser per seed, trained by the diffuser jobs and only loaded by the agent runs
    assert len(list((root / "diffusers").glob("*.pt"))) == 2
    for log in (root / "hopper-medium-replay").glob("pgd_*__guided__*.log"):
        text = log.read_text()
        assert "loaded diffuser" in text and "saved diffuser" not in text, log
    # the report's cells are the runs' numbers
    results = {}
    for script in ("pgd_iql", "pgd_td3bc"):
        for variant in ("real", "guided"):
            scores = [sweep.result_of(str(root / "hopper-medium-replay" / f"{script}__{variant}__{seed}"))["last_score"]
                      for seed in (1, 2)]
            results[(script, variant)] = (np.mean(scores), np.std(scores, ddof=1) / np.sqrt(2))
    table = (root / "report" / "table1.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| hopper-medium-replay |"))
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")[1:]]
    expected = [results[(s, v)] for s in ("pgd_iql", "pgd_td3bc") for v in ("real", "guided")]
    assert cells == [f"{m:.1f} +- {se:.1f}" for m, se in expected]
    for i, script in enumerate(("pgd_iql", "pgd_td3bc")):  # the better variant of each agent is bold
        pair = row.strip("|").split("|")[1 + 2 * i: 3 + 2 * i]
        bold = [c.strip().startswith("**") for c in pair]
        assert bold == [expected[2 * i][0] >= expected[2 * i + 1][0], expected[2 * i][0] < expected[2 * i + 1][0]]
    csv_lines = (root / "report" / "scores.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 8 and csv_lines[0].startswith("env_id,script,variant,seed,last_score")
    iqm = (root / "report" / "iqm.md").read_text()
    assert "| pgd_td3bc guided |" in iqm and "95% CI" in iqm
    for png in ("figure4.png", "iqm.png"):
        assert (root / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same command again: everything is skipped, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("hopper-medium-replay/*/*/results.json")}
    assert len(stamps) == 10
    p = run_sweep(flags, tiny_store)
    assert "2 of 2 diffuser jobs and 8 of 8 agent runs finished already (skipped); 0 to run" in p.stdout
    assert stamps == {p: p.stat().st_mtime_ns for p in root.glob("hopper-medium-replay/*/*/results.json")}
    # a run lost (deleted) is the only one run again
    shutil.rmtree(root / "hopper-medium-replay" / "pgd_iql__real__2")
    p = run_sweep(flags, tiny_store)
    assert "8 of 9" not in p.stdout and "7 of 8 agent runs finished already (skipped); 1 to run" in p.stdout
    assert "agent hopper-medium-replay pgd_iql.py real seed 2: done" in p.stdout


def test_slurm_submission_parameters_without_a_cluster(tmp_path, monkeypatch):
    import submitit
    args = sweep.Args(env_ids=("hopper-medium-v2",), seeds=(1, 2), launcher="slurm", slurm_partition="gpu",
                      slurm_account="rl", gpus_per_node=1, cpus_per_task=6, mem_gb=40, timeout_min=600,
                      array_parallelism=16, runs_root=str(tmp_path))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun" if name == "srun" else real_which(name))
    executor = submitit.AutoExecutor(folder=str(tmp_path / "logs"), cluster="slurm")
    executor.update_parameters(**sweep.slurm_parameters(args, "pgd-agent", ["101", "102"]))
    text = executor._executor._make_submission_file_text("python pgd_iql.py", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --account=rl", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --mem=40GB", "#SBATCH --time=600", "#SBATCH --job-name=pgd-agent",
                 "#SBATCH --dependency=afterok:101:102", "#SBATCH --signal=USR2@120"):
        assert line in text, (line, text)
    assert executor._executor.parameters["array_parallelism"] == 16
    # requeue after a preemption resubmits the same command, which resumes the run
    diffusers, agents = sweep.plan(args)
    assert len(diffusers) == 2 and len(agents) == 2 * 2 * 3
    cmd = agents[0].command(args)
    assert "--resume" in cmd and cmd[cmd.index("--checkpoint-every") + 1] == "10000"
    call = sweep.RunCommand()
    delayed = call.checkpoint(cmd, "log")
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and delayed.args == (cmd, "log")
    d_cmd = diffusers[0].command(args)
    assert "--diffuser-only" in d_cmd and "--resume" not in d_cmd


@pytest.mark.parametrize("flags, message", [(["--variants", "nope"], "--variants nope"),
                                            (["--jobs", "0"], "--jobs 0"),
                                            (["--scripts", "toy2d.py"], "--scripts toy2d.py")])
def test_bad_flags_are_one_line(flags, message, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sweep.py"), *flags, "--runs-root", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line and not (tmp_path / "r").exists()


def test_report_only_with_nothing_finished(tmp_path):
    out = sweep.main(sweep.Args(env_ids=("hopper-medium-v2",), seeds=(1,), runs_root=str(tmp_path), report_only=True))
    assert out["rows"] == [] and "| hopper-medium-v2 | - |" in out["table"]
    assert json.dumps(out["iqm"]).startswith('"no agent')


def test_dydiff_is_one_more_row_with_its_own_flags_and_report_column(tmp_path):
    """dydiff_td3bc.py in --scripts: one variant (dydiff), no diffuser job, no --preset / diffuser cache, only the flags
    its Args has (PGD's --guidance-coef stays out, its --iterations goes in), resumable like the others; its column in
    Table 1 holds its runs' numbers."""
    args = sweep.Args(env_ids=("hopper-medium-replay",), scripts=("pgd_td3bc.py", "dydiff_td3bc.py"),
                      variants=("real", "guided"), seeds=(1, 2), runs_root=str(tmp_path),
                      extra=("--guidance-coef", "0.3", "--iterations", "1", "--total-steps", "100"))
    sweep.check_args(args)
    diffusers, agents = sweep.plan(args)
    assert [j.script for j in diffusers] == ["pgd_td3bc.py"] * 2
    assert [(j.script, j.variant) for j in agents if j.seed == 1] == [
        ("pgd_td3bc.py", "real"), ("pgd_td3bc.py", "guided"), ("dydiff_td3bc.py", "dydiff")]
    dy = agents[2].command(args)
    assert "--preset" not in dy and "--diffuser-cache-dir" not in dy and "--guidance-coef" not in dy
    assert dy[dy.index("--iterations") + 1] == "1" and dy[dy.index("--total-steps") + 1] == "100"
    assert "--resume" in dy and dy[dy.index("--exp-name") + 1] == "dydiff_td3bc-dydiff"
    guided = agents[1].command(args)
    assert "--iterations" not in guided and guided[guided.index("--guidance-coef") + 1] == "0.3"
    for job, score in zip(agents, [10, 20, 30, 12, 22, 34]):
        run_dir = os.path.join(job.root(str(tmp_path)), "run")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(dict(status="finished", last_score=score, best_score=score, wall_time_s=60), f)
    out = sweep.report(args)
    assert "| dataset | pgd_td3bc real | pgd_td3bc guided | dydiff_td3bc dydiff |" in out["table"]
    assert "| hopper-medium-replay | 11.0 +- 1.0 | **21.0 +- 1.0** | 32.0 +- 2.0 |" in out["table"]
    assert "| dydiff_td3bc dydiff |" in out["iqm"]
    with pytest.raises(SystemExit, match="--bogus"):
        sweep.check_args(dataclasses.replace(args, extra=("--bogus", "1")))
