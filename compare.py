"""Report script: real data vs unguided diffusion vs policy-guided diffusion, for pgd_iql.py and pgd_td3bc.py.

Runs every (script, variant, seed) as a subprocess with the same extra flags, then writes a markdown table of the
final and best D4RL-normalised scores (mean +- std over seeds) and wall times. The diffuser is trained once per
seed and shared by all variants and agents through the checkpoint cache (it depends on the dataset, the diffuser
flags and the seed only).

    python compare.py --env-id hopper-medium-replay --seeds 1 2 --out docs/compare_hopper-medium-replay.md -- \
        --total-steps 20000 --diffuser-steps 10000
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tyro

VARIANTS = {"real": ["--synthetic-ratio", "0"], "unguided": ["--guidance-coef", "0"], "guided": []}


@dataclass
class Args:
    env_id: str = "hopper-medium-replay"
    """dataset short name (see collect_datasets.py)"""
    scripts: tuple[str, ...] = ("pgd_iql.py", "pgd_td3bc.py")
    """agent scripts to compare"""
    variants: tuple[str, ...] = ("real", "unguided", "guided")
    """which of real / unguided / guided to run"""
    seeds: tuple[int, ...] = (1,)
    """seeds"""
    jobs: int = 1
    """runs in parallel (after the diffusers are trained)"""
    runs_root: str = "runs/compare"
    """run directories go here"""
    out: str = ""
    """also write the markdown table to this file"""
    extra: tuple[str, ...] = field(default_factory=tuple)
    """flags passed to every run (or put them after `--`)"""
    report_only: bool = False
    """run nothing: tabulate the finished runs found under --runs-root (missing ones are left out)"""


# SHARED BEGIN: validation
def check_ranges(args, ranges: dict[str, str]):
    """Stop with one line naming the first field outside its interval (e.g. `[1, inf)`, `(0, 1)`; every entry of a tuple
    field); NaN never passes; None (a field still to be resolved from another) is skipped."""
    for name, interval in ranges.items():
        low, high = (float(b) for b in interval[1:-1].split(","))
        value = getattr(args, name)
        for v in (value if isinstance(value, (tuple, list)) else () if value is None else (value,)):
            above = v >= low if interval[0] == "[" else v > low
            below = v <= high if interval[-1] == "]" else v < high
            if not (above and below):
                raise SystemExit(f"error: --{name.replace('_', '-')} {value} is outside its valid range {interval}")


# SHARED END: validation


RANGES = dict(jobs="[1, inf)", seeds="(-inf, inf)")


def finished(root: str) -> dict | None:
    """results.json of the run under `root`, or None if it has not finished."""
    paths = [os.path.join(root, d, "results.json") for d in os.listdir(root)] if os.path.isdir(root) else []
    results = [json.load(open(p)) for p in paths if os.path.isfile(p)]
    results = [r for r in results if r.get("status") != "failed"]
    return results[0] if results else None


def run(args: Args, script: str, variant: str, seed: int) -> dict:
    root = os.path.join(args.runs_root, f"{script[:-3]}__{variant}__{seed}")
    if args.report_only:
        return finished(root)
    cmd = [sys.executable, script, "--env-id", args.env_id, "--seed", str(seed), "--runs-root", root,
           "--exp-name", f"{script[:-3]}-{variant}", *VARIANTS[variant], *args.extra]
    print(" ".join(cmd), flush=True)
    start = time.time()
    with open(f"{root}.log", "w") as log:
        threads = {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {}  # parallel runs must not oversubscribe the cores
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **threads})
    if code:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {code}); see {root}.log")
    res = finished(root)
    print(f"  {script} {variant} seed {seed}: last {res['last_score']:.1f} best {res['best_score']:.1f} "
          f"({(time.time() - start) / 60:.1f} min)", flush=True)
    return res


def main(args: Args):
    if "--" in sys.argv:
        args = dataclasses.replace(args, extra=tuple(sys.argv[sys.argv.index("--") + 1:]))
    check_ranges(args, RANGES)
    bad = [v for v in args.variants if v not in VARIANTS] + [s for s in args.scripts if s not in ("pgd_iql.py", "pgd_td3bc.py")]
    if bad or not args.seeds:
        raise SystemExit(f"error: {' '.join(bad) or '--seeds (none)'}: --variants take {', '.join(VARIANTS)}, "
                         f"--scripts pgd_iql.py / pgd_td3bc.py, --seeds at least one")
    os.makedirs(args.runs_root, exist_ok=True)
    jobs = [(s, v, seed) for seed in args.seeds for s in args.scripts for v in args.variants]
    # the first diffusion run of each seed trains and caches that seed's diffuser; the others then load it
    first = {seed: next(j for j in jobs if j[2] == seed and j[1] != "real") for seed in args.seeds
             if any(j[2] == seed and j[1] != "real" for j in jobs)}
    with ThreadPoolExecutor(1 if args.report_only else args.jobs) as pool:
        results = dict(zip(first.values(), pool.map(lambda j: run(args, *j), first.values())))
        rest = [j for j in jobs if j not in results]
        results.update(zip(rest, pool.map(lambda j: run(args, *j), rest)))

    lines = ["| agent | data | last score | best score | wall time (min) | seeds |", "|---|---|---|---|---|---|"]
    for s in args.scripts:
        for v in args.variants:
            rs = [results[(s, v, seed)] for seed in args.seeds if results.get((s, v, seed))]
            if not rs:
                continue
            last, best = np.array([r["last_score"] for r in rs]), np.array([r["best_score"] for r in rs])
            wall = [r["wall_time_s"] for r in rs]
            lines.append(f"| {s[:-3]} | {v} | {last.mean():.1f} +- {last.std():.1f} | {best.mean():.1f} +- {best.std():.1f} "
                         f"| {np.mean(wall) / 60:.1f} | {len(rs)} |")
    table = "\n".join(lines)
    header = (f"{args.env_id}, seeds {list(args.seeds)}; flags: `{' '.join(args.extra)}`\n"
              f"command: `python {' '.join(sys.argv)}`\n\n")
    print(header + table)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    argv = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    main(tyro.cli(Args, args=argv))
