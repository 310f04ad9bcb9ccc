"""Smoke tests of bench.py: `--quick` prints the markdown table, `--quick --profile` the op breakdown (no timing
asserts)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick_prints_table():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| measurement | rate | details |" in out.stdout
    for row in ("| sampler, guided, eager |", "| sampler, unguided, eager |", "| diffuser training, CPU default |",
                "| diffuser training, 0.7M bench |", "| agent updates, IQL, eager |", "| agent updates, TD3+BC, eager |",
                "| agent updates, IQL, compiled | skipped |"):  # --quick compiles nothing
        assert row in out.stdout, out.stdout
    # the sampler's network FLOP rate against the plain matmul's
    assert re.search(r"\| sampler, guided, eager \|.*GFLOP/s of the network = \d+% of the plain matmul's rate", out.stdout)
    assert "torch " in out.stdout and "command: `" in out.stdout


def test_bench_profile_reports_convolution_share():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--profile"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "aten::" in out.stdout and "ms per denoiser eval" in out.stdout
    share = float(re.search(r"convolutions (\d+)%", out.stdout).group(1))
    assert 0 < share <= 100  # the U-Net's convolutions are found among the profiled ops
    assert "| measurement | rate | details |" not in out.stdout  # --profile replaces the table


def test_bench_only_times_the_chosen_parts():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--only", "agents"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| agent updates, IQL, eager |" in out.stdout and "| agent updates, TD3+BC, eager |" in out.stdout
    assert "| sampler" not in out.stdout and "| diffuser training" not in out.stdout
    # the agents' matmul FLOPs per update (FlopCounterMode) next to a plain matmul's rate: TD3+BC (one actor update
    # every other step) does fewer than IQL (actor, value and critics every step)
    flops = {k: float(re.search(rf"\| agent updates, {k}, eager \|.*?; (\d+) MFLOP of matmuls per update", out.stdout).group(1))
             for k in ("IQL", "TD3\\+BC")}
    assert 0 < flops["TD3\\+BC"] < flops["IQL"] and "| matmul 8x8x8, float32 |" in out.stdout


def test_bench_compiled_agents_row_and_ratio():
    """--only agents --compile with a tiny run: the compiled rows and their ratio to eager, measured in the same run."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--only", "agents", "--compile", "True"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for agent in ("IQL", "TD3\\+BC"):
        row = re.search(rf"\| agent updates, {agent}, compiled \| ([\d.]+) updates/s \|.*; ([\d.]+)x eager", out.stdout)
        assert row and float(row.group(1)) > 0 and float(row.group(2)) > 0, out.stdout


def test_rates_are_written_in_plain_notation():
    """The table's rates are 3 significant figures without exponent notation: a fast machine's 1,070 updates/s once
    printed as 1.07e+03 and broke the table's readers (the compiled-row regex above)."""
    sys.path.insert(0, ROOT)
    import bench
    cases = {1070.4: "1070", 12345.6: "12300", 779.2: "779", 2.184: "2.18", 13.8: "13.8", 0.05683: "0.0568", 99.96: "100", 0.0: "0"}
    for x, want in cases.items():
        assert bench.sig3(x) == want, (x, bench.sig3(x))
    assert re.fullmatch(r"[\d.]+", bench.sig3(2.5e6))


def test_official_jax_bench_bad_inputs_one_line():
    """tools/bench_official_jax.py (run in its own JAX venv) refuses a path that is not the official checkout, and
    non-positive sizes, with one line and no traceback, before it imports JAX (so this runs without JAX)."""
    tool = os.path.join(ROOT, "tools", "bench_official_jax.py")
    for extra, words in ((["--pgd-repo", ROOT], "not a checkout of EmptyJackson/policy-guided-diffusion"),
                         (["--pgd-repo", ROOT, "--steps", "0"], "--steps must be positive")):
        out = subprocess.run([sys.executable, tool, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert words in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
