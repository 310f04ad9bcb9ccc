"""Speed benchmark of the PGD scripts (random weights: timing only, no dataset needed); prints a markdown table.

1. Sampler trajectories/s at the configuration of the official JAX PGD sampler comparison (1-D U-Net with 64 base
   features, 3 levels, ~0.7M params; windows of 32 steps x 25 channels; 256 Heun+churn steps; batch 64), guided by a
   256x256 IQL policy and unguided, eager and torch.compile'd. The first call (warm-up, compilation) is excluded from
   the rate; the compile time is reported separately (first call minus a timed call).
2. Diffuser training steps/s at batch 64 (the scripts' own train_diffuser: EDM loss, Adam, EMA), eager and compiled
   (--compile), for the CPU default diffuser and the 0.7M config.
3. Agent updates/s at batch 256: IQL (pgd_iql) and TD3+BC (pgd_td3bc, when that script exists), the scripts' own
   agent.update, eager and compiled (--compile-agent), their ratio from one run; the matmul FLOP rate they reach.

Usage: python bench.py                 (full benchmark, several minutes on a 2-core CPU)
       python bench.py --quick         (tiny sizes, seconds: a smoke test)
Rates are the best of `--repeats` timed runs (the machine may be shared; the load average is printed).
"""
import dataclasses
import functools
import importlib
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgd_iql  # noqa: E402

try:
    pgd_td3bc = importlib.import_module("pgd_td3bc")
except ModuleNotFoundError:
    pgd_td3bc = None


@dataclass
class BenchArgs:
    repeats: int = 3
    """timed runs per measurement (the best one is reported)"""
    quick: bool = False
    """tiny sizes and a few steps (seconds): a smoke test of this script, not a measurement"""
    compile: Optional[bool] = None
    """also time the torch.compile'd sampler and agents (default: on, off with --quick)"""
    device: str = "cpu"
    """torch device"""
    threads: Optional[int] = None
    """torch.set_num_threads (default: torch's choice; 1 with --quick, robust on a loaded machine)"""
    sampler_steps: int = 256
    """Heun steps of the timed sampler"""
    sampler_batch: int = 64
    """trajectories per sampler batch"""
    horizon: int = 32
    """window length"""
    obs_dim: int = 17
    """observation channels (17 + 6 + reward + terminal = 25 channels, as walker2d)"""
    act_dim: int = 6
    """action channels"""
    diffuser_train_steps: int = 30
    """timed diffuser training steps per repeat"""
    agent_updates: int = 200
    """timed agent updates per repeat"""
    seed: int = 0
    """seed of the random weights and inputs"""
    only: tuple[Literal["sampler", "diffuser", "agents"], ...] = ()
    """time only these parts (default: all three)"""
    sampler_bf16: bool = True
    """also time the sampler with its network in bfloat16 (off on CPUs without native bf16: emulated, 8-10x slower)"""
    profile: bool = False
    """instead of the table: where the time of the guided sampler goes (compiled unless --quick or --no-compile), by
    torch.profiler (top ops by self CPU time over 16 sampler steps)"""


# The U-Net closest to the JAX comparison model, and the scripts' CPU default diffuser.
BENCH_DIFFUSER = dict(diffuser_channels=64, diffuser_mults=(1, 1, 1), diffuser_kernel_size=3)
QUICK_DIFFUSER = dict(diffuser_channels=8, diffuser_mults=(1, 2), diffuser_kernel_size=3)


def make_args(module, **overrides):
    """module.Args with the overrides that exist in this version of the script (others are ignored)."""
    names = {f.name for f in dataclasses.fields(module.Args)}
    return module.Args(**{k: v for k, v in overrides.items() if k in names})


def sig3(x: float) -> str:
    """x to 3 significant figures in plain notation (1070, 2.18, 0.0568), never 1.07e+03: the table is read by people
    and parsed by the tests."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    x = float(f"{x:.3g}")  # round first, so 99.96 becomes 100, not 100.0
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Seconds of the fastest of `repeats` calls."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def random_stats(obs_dim: int) -> dict:
    return dict(obs_mean=torch.zeros(obs_dim), obs_std=torch.ones(obs_dim), return_min=0.0, return_max=1000.0)


def random_batch(n: int, obs_dim: int, act_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    return dict(obs=torch.randn(n, obs_dim, device=device), actions=torch.rand(n, act_dim, device=device) * 2 - 1,
                rewards=torch.randn(n, device=device), next_obs=torch.randn(n, obs_dim, device=device),
                dones=(torch.rand(n, device=device) < 0.01).float())


def random_denoiser(args, data_dim: int, device: torch.device):
    """A denoiser of the script's architecture with small random weights (the zero-initialised output layer would
    make the network a no-op)."""
    config = {k: getattr(args, k) for k in pgd_iql.DIFFUSER_FIELDS}
    denoiser = pgd_iql.build_denoiser(config, data_dim).to(device)
    with torch.no_grad():
        for p in denoiser.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return denoiser


def build_sampler(b: BenchArgs, diffuser: dict, guided: bool, compiled: bool, device: torch.device, bf16: bool):
    data_dim = b.obs_dim + b.act_dim + 2
    args = make_args(pgd_iql, **diffuser, horizon=b.horizon, sampler_steps=b.sampler_steps, compile=compiled,
                     device=str(device), sampler_bf16=bf16)
    torch.manual_seed(b.seed)
    denoiser = random_denoiser(args, data_dim, device).requires_grad_(False)
    normalizer = pgd_iql.Normalizer(torch.randn(data_dim) * 0.1, torch.rand(data_dim) + 0.5).to(device)
    agent = pgd_iql.make_agent(args, b.act_dim, random_stats(b.obs_dim)).to(device)
    sampler = pgd_iql.GuidedEDMSampler(denoiser, normalizer, b.obs_dim, b.act_dim,
                                       **{k: getattr(args, k) for k in pgd_iql.SAMPLER_FIELDS})
    return functools.partial(sampler, log_prob_fn=agent.log_prob if guided else None, coef=0.1 if guided else 0.0), \
        denoiser


def bench_sampler(b: BenchArgs, diffuser: dict, guided: bool, compiled: bool, device: torch.device,
                  bf16: bool = False) -> dict:
    sampler, denoiser = build_sampler(b, diffuser, guided, compiled, device, bf16)
    gen = torch.Generator().manual_seed(b.seed)
    run = lambda: sampler(b.sampler_batch, b.horizon, gen)  # noqa: E731
    sync(device)
    t0 = time.perf_counter()
    run()  # warm-up: compilation, allocator, oneDNN primitive caches
    sync(device)
    first = time.perf_counter() - t0
    t = best_time(run, b.repeats, device)
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(b.sampler_batch, b.horizon, b.obs_dim + b.act_dim + 2, device=device)
    with FlopCounterMode(display=False) as counter:  # one denoiser evaluation, eager (compiled kernels are not seen)
        denoiser(x, torch.ones((), device=device))
    evals = 2 * b.sampler_steps - 1  # Heun: two per step, one in the last
    return dict(params=sum(p.numel() for p in denoiser.parameters()), traj_per_s=b.sampler_batch / t, batch_s=t,
                eval_ms=t / evals * 1e3, compile_s=max(0.0, first - t) if compiled else None,
                flops_per_s=counter.get_total_flops() * evals / t)


class NoWriter:
    """A stand-in for SummaryWriter: the benchmark keeps no logs."""

    def add_scalar(self, *args, **kwargs):
        pass


def bench_diffuser_training(b: BenchArgs, diffuser: dict, device: torch.device, compiled: bool) -> dict:
    """Steps/s of the scripts' own `train_diffuser` (EDM loss, fused Adam, warmup + cosine schedule, foreach EMA; with
    `compiled`, its step compiled as --compile does) at the script's batch size: each of --repeats calls trains
    --diffuser-train-steps + 1 steps, and the rate is over the steps after the first (which holds the compilation),
    read from the loss curve's clock (its last point includes one validation pass); the best call is reported."""
    data_dim = b.obs_dim + b.act_dim + 2
    batch = 4 if b.quick else pgd_iql.Args.diffuser_batch_size
    args = make_args(pgd_iql, **diffuser, horizon=b.horizon, device=str(device), diffuser_steps=b.diffuser_train_steps + 1,
                     diffuser_batch_size=batch)
    config = {k: getattr(args, k) for k in pgd_iql.DIFFUSER_FIELDS}
    windows = torch.randn(1024, b.horizon, data_dim).numpy()
    quiet = functools.partial(pgd_iql.tqdm, disable=True)
    rates = []
    for _ in range(b.repeats):
        torch.manual_seed(b.seed)
        original, pgd_iql.tqdm = pgd_iql.tqdm, quiet
        try:
            curve = pgd_iql.train_diffuser(config, windows, windows[:64], NoWriter(), device, compile=compiled)[2]
        finally:
            pgd_iql.tqdm = original
        if not rates:
            first_step_s = curve[0]["seconds"]  # the first call's (the one that compiles, with `compiled`)
        rates.append(b.diffuser_train_steps / (curve[-1]["seconds"] - curve[0]["seconds"]))
    params = sum(p.numel() for p in pgd_iql.build_denoiser(config, data_dim).parameters())
    return dict(params=params, steps_per_s=max(rates), batch=batch, first_step_s=first_step_s)


def bench_agent(module, b: BenchArgs, device: torch.device, compiled: bool) -> dict:
    """updates/s of the script's own agent.update (its training step) at the script's batch size, eager and, if
    `compiled`, with the script's compile_agent (--compile-agent); the two are timed in alternation (repeat i of each
    back to back), so a load that changes during the benchmark reaches both, and their ratio is one run's."""
    args = make_args(module, device=str(device), total_steps=10 ** 6)
    batch_size = 8 if b.quick else args.batch_size
    batch = random_batch(batch_size, b.obs_dim, b.act_dim, device)
    agents = {}
    for mode in ("eager", "compiled") if compiled else ("eager",):
        torch.manual_seed(b.seed)
        agents[mode] = module.make_agent(args, b.act_dim, random_stats(b.obs_dim)).to(device)
    if compiled:
        module.compile_agent(agents["compiled"], device)
    result, times = dict(batch=batch_size), {mode: [] for mode in agents}
    for mode, agent in agents.items():
        t0 = time.perf_counter()
        for _ in range(4):  # warm-up; compilation (every graph: TD3+BC's actor step runs every other update)
            agent.update(batch)
        sync(device)
        result[f"{mode}_warmup_s"] = time.perf_counter() - t0
    for _ in range(b.repeats):
        for mode, agent in agents.items():
            times[mode].append(best_time(lambda: [agent.update(batch) for _ in range(b.agent_updates)], 1, device))
    for mode in agents:
        result[f"{mode}_updates_per_s"] = b.agent_updates / min(times[mode])
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:  # the matmul FLOPs per update, backward included (two updates:
        agents["eager"].update(batch)                # TD3+BC's actor runs every other one)
        agents["eager"].update(batch)
    result["flops"] = counter.get_total_flops() / 2
    return result


def matmul_rate(n: int, b: BenchArgs, device: torch.device) -> float:
    """FLOP/s of one float32 [n, n] @ [n, n] matmul (the agents' hidden-layer shape at batch n = 256), best of repeats."""
    x, w = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    reps = 20 if b.quick else 500

    def run():
        for _ in range(reps):
            torch.mm(x, w)

    run()
    return reps * 2 * n ** 3 / best_time(run, b.repeats, device)


def profile_sampler(b: BenchArgs, diffuser: dict, compiled: bool, device: torch.device):
    """Print the top ops (self CPU time) of one guided sampler run after a warm-up, and the share in convolutions."""
    sampler, denoiser = build_sampler(b, diffuser, True, compiled, device, False)
    params = sum(p.numel() for p in denoiser.parameters())
    gen = torch.Generator().manual_seed(b.seed)
    sampler(b.sampler_batch, b.horizon, gen)  # warm-up / compilation
    with torch.profiler.profile() as prof:
        sampler(b.sampler_batch, b.horizon, gen)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    print(events.table(sort_by="self_cpu_time_total", row_limit=10))
    print(f"{params / 1e6:.2f}M params, {b.sampler_steps} steps, batch {b.sampler_batch}: "
          f"{total / 1e6:.2f} s profiled, convolutions {100 * conv / max(total, 1):.0f}% "
          f"({conv / 1e3 / (2 * b.sampler_steps - 1):.2f} ms per denoiser eval)")


def machine_info(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores, load average {load}",
             f"- torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
             + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
             f"- command: `{' '.join([os.path.basename(sys.executable), *sys.argv])}`"]
    return lines


# valid range of every numeric field
RANGES = dict(repeats="[1, inf)", threads="[1, inf)", sampler_steps="[1, inf)", sampler_batch="[1, inf)",
              horizon="[2, inf)", obs_dim="[1, inf)", act_dim="[1, inf)", diffuser_train_steps="[1, inf)",
              agent_updates="[1, inf)", seed="(-inf, inf)")


def main(b: BenchArgs):
    pgd_iql.check_ranges(b, RANGES)
    if b.threads or b.quick:
        torch.set_num_threads(b.threads or 1)
    if b.quick:
        b = dataclasses.replace(b, sampler_steps=4, sampler_batch=4, horizon=8, diffuser_train_steps=2,
                                agent_updates=3, repeats=1)
    compiled = (not b.quick) if b.compile is None else b.compile
    device = torch.device(b.device)
    bench_diffuser = QUICK_DIFFUSER if b.quick else BENCH_DIFFUSER
    cpu_default = QUICK_DIFFUSER if b.quick else {k: getattr(pgd_iql.Args, k) for k in BENCH_DIFFUSER}
    print("\n".join(machine_info(device)), flush=True)
    if b.profile:
        return profile_sampler(dataclasses.replace(b, sampler_steps=min(b.sampler_steps, 16)), bench_diffuser,
                               compiled, device)

    rows, only = [], set(b.only or ("sampler", "diffuser", "agents"))
    # bf16 rows only where the script has the `sampler_bf16` option (float32 network otherwise)
    has_bf16 = "sampler_bf16" in {f.name for f in dataclasses.fields(pgd_iql.Args)}
    variants = ([(True, False), (False, False)] + ([(True, True)] if has_bf16 and b.sampler_bf16 else [])) \
        if "sampler" in only else []
    # the FLOP rate the sampler and the agents reach, against one plain float32 matmul of the agents' layer shape
    n = 8 if b.quick else 256
    peak = matmul_rate(n, b, device) if only & {"sampler", "agents"} else None
    if peak:
        rows.append((f"matmul {n}x{n}x{n}, float32", f"{sig3(peak / 1e9)} GFLOP/s", "torch.mm, the agents' layer shape"))
        print(f"{rows[-1][0]}: {rows[-1][1]}", flush=True)
    for guided, bf16 in variants:
        for mode in ("eager", "compiled"):
            name = f"sampler, {'guided' if guided else 'unguided'}, {mode}{', bf16 network' if bf16 else ''}"
            if mode == "compiled" and not compiled:
                rows.append((name, "skipped", ""))
                continue
            r = bench_sampler(b, bench_diffuser, guided, mode == "compiled", device, bf16)
            detail = (f"{r['params'] / 1e6:.2f}M params, {b.sampler_steps} steps, batch {b.sampler_batch} x "
                      f"{b.horizon} x {b.obs_dim + b.act_dim + 2}: {r['batch_s']:.2f} s/batch, "
                      f"{r['eval_ms']:.2f} ms/denoiser eval (incl. guidance), {sig3(r['flops_per_s'] / 1e9)} GFLOP/s "
                      f"of the network = {100 * r['flops_per_s'] / peak:.0f}% of the plain matmul's rate")
            if r["compile_s"] is not None:
                detail += f", compile {r['compile_s']:.0f} s"
            rows.append((name, f"{sig3(r['traj_per_s'])} traj/s", detail))
            print(f"{name}: {rows[-1][1]}", flush=True)
    for label, diffuser in (("CPU default", cpu_default), ("0.7M bench", bench_diffuser)) if "diffuser" in only else ():
        for mode in ("eager", "compiled"):
            name = f"diffuser training, {label}" + (", compiled" if mode == "compiled" else "")
            if mode == "compiled" and not compiled:
                rows.append((name, "skipped", ""))
                continue
            r = bench_diffuser_training(b, diffuser, device, mode == "compiled")
            rows.append((name, f"{sig3(r['steps_per_s'])} steps/s",
                         f"{r['params'] / 1e6:.2f}M params, channels {diffuser['diffuser_channels']}, mults "
                         f"{tuple(diffuser['diffuser_mults'])}, kernel {diffuser['diffuser_kernel_size']}, batch "
                         f"{r['batch']}; first step {r['first_step_s']:.1f} s" + (" (compilation)" if mode == "compiled" else "")))
            print(f"{rows[-1][0]}: {rows[-1][1]}", flush=True)
    for label, module in (("IQL", pgd_iql), ("TD3+BC", pgd_td3bc)) if "agents" in only else ():
        if module is None:
            continue
        r = bench_agent(module, b, device, compiled)
        for mode in ("eager", "compiled"):
            if f"{mode}_updates_per_s" not in r:
                rows.append((f"agent updates, {label}, {mode}", "skipped", ""))
                continue
            rate = r[f"{mode}_updates_per_s"]
            achieved = r["flops"] * rate
            detail = (f"batch {r['batch']}; {r['flops'] / 1e6:.0f} MFLOP of matmuls per update, {sig3(achieved / 1e9)} "
                      f"GFLOP/s = {100 * achieved / peak:.0f}% of the plain matmul's rate")
            if mode == "compiled":
                detail += (f"; {rate / r['eager_updates_per_s']:.2f}x eager (same run, alternating repeats), "
                           f"compile {r['compiled_warmup_s'] - r['eager_warmup_s']:.0f} s")
            rows.append((f"agent updates, {label}, {mode}", f"{sig3(rate)} updates/s", detail))
            print(f"{rows[-1][0]}: {rows[-1][1]} ({rows[-1][2]})", flush=True)

    print(f"\n## PGD benchmark{' (--quick: smoke test, not a measurement)' if b.quick else ''}\n")
    print("\n".join(machine_info(device)))
    print(f"- best of {b.repeats} timed runs after one warm-up run\n")
    print("| measurement | rate | details |\n|---|---|---|")
    for name, rate, detail in rows:
        print(f"| {name} | {rate} | {detail} |")
    return rows


if __name__ == "__main__":
    main(tyro.cli(BenchArgs))
