"""Report script: real data vs unguided diffusion vs policy-guided diffusion, for pgd_iql.py and pgd_td3bc.py.

Runs every (script, variant, seed) as a subprocess with the same extra flags, then writes a markdown table of the
final and best D4RL-normalised scores (mean +- standard error over seeds) and wall times, a table of the mechanism
diagnostics each run stores (synthetic actions' log-likelihood under the policy, critics on real vs synthetic data),
and (with --out) the paper's Figure 4 as a PNG next to the markdown. A grid can be split over sittings: run one seed at
a time (finished runs are skipped), then `--report-only` with all the seeds. The diffuser is trained once per
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

# SHARED BEGIN: script_flags
VARIANTS = {"real": ["--synthetic-ratio", "0"], "unguided": ["--guidance-coef", "0"], "guided": []}
DYDIFF = "dydiff_td3bc.py"  # one more row: DyDiff with the same agent, data and evaluation (its one variant: dydiff)
SCRIPTS = ("pgd_iql.py", "pgd_td3bc.py", DYDIFF)


def variants_of(args, script: str) -> list[str]:
    return ["dydiff"] if script == DYDIFF else list(args.variants)


def flags_for(script: str, extra: tuple[str, ...]) -> list[str]:
    """The flags after `--` that name a field of `script`'s Args, with their values: PGD-only flags (--guidance-coef,
    --regenerate-every, ...) do not reach dydiff_td3bc.py, DyDiff-only ones (--iterations, --dynamics-steps, ...) do not
    reach the PGD scripts."""
    import importlib
    fields = {f.name for f in dataclasses.fields(importlib.import_module(script[:-3]).Args)}
    keep, out = False, []
    for token in extra:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            keep = name in fields or (name.startswith("no_") and name[3:] in fields)
        if keep:
            out.append(token)
    return out


def check_scripts_and_flags(args):
    """One line and exit for an unknown variant or script, or a flag after `--` that no script of --scripts takes."""
    for what, values, known in (("--variants", args.variants, tuple(VARIANTS)), ("--scripts", args.scripts, SCRIPTS)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise SystemExit(f"error: {what} {' '.join(bad) or '(none)'}: use some of {', '.join(known)}")
    if not args.seeds:
        raise SystemExit("error: --seeds (none): give at least one")
    unknown = sorted({t.split("=")[0] for t in args.extra if t.startswith("--")} -
                     {t.split("=")[0] for s in args.scripts for t in flags_for(s, args.extra) if t.startswith("--")})
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)}: no script of --scripts takes it (see each script's --help)")


# SHARED END: script_flags


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
    done = finished(root)
    if args.report_only or done:  # a finished run is never rerun: a grid can be completed seed by seed
        return done
    cmd = [sys.executable, script, "--env-id", args.env_id, "--seed", str(seed), "--runs-root", root,
           "--exp-name", f"{script[:-3]}-{variant}", *flags_for(script, args.extra), *VARIANTS.get(variant, [])]
    # the variant's own flags come last and win: `-- --guidance-coef 0.3` sets the guided runs' coefficient only
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
    check_scripts_and_flags(args)
    os.makedirs(args.runs_root, exist_ok=True)
    jobs = [(s, v, seed) for seed in args.seeds for s in args.scripts for v in variants_of(args, s)]
    # the first diffusion run of each seed trains and caches that seed's diffuser; the others then load it
    diffusion = lambda j, seed: j[2] == seed and j[1] not in ("real", "dydiff")  # noqa: E731  (PGD's diffuser)
    first = {seed: next(j for j in jobs if diffusion(j, seed)) for seed in args.seeds if any(diffusion(j, seed) for j in jobs)}
    with ThreadPoolExecutor(1 if args.report_only else args.jobs) as pool:
        results = dict(zip(first.values(), pool.map(lambda j: run(args, *j), first.values())))
        rest = [j for j in jobs if j not in results]
        results.update(zip(rest, pool.map(lambda j: run(args, *j), rest)))

    report = tabulate(args, results)
    header = (f"{args.env_id}, seeds {list(args.seeds)}; flags: `{' '.join(args.extra)}`\n"
              f"command: `python {' '.join(sys.argv)}`\n\n")
    print(header + report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        figure = os.path.splitext(args.out)[0] + ".png"
        plot_figure4(args, results, figure)
        with open(f"{args.out}.tmp", "w") as f:
            f.write(header + report + f"\n\n![Figure 4]({os.path.basename(figure)})\n")
        os.replace(f"{args.out}.tmp", args.out)
        print(f"wrote {args.out} and {figure}")


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean over seeds (0 for one seed)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def mechanism(r: dict) -> dict:
    """Per run: mean action log-likelihood of the synthetic sets after the first under the policy that made them,
    the real data's under the same policy, and the critics' mean Q on real and synthetic batches at the last evaluation."""
    regens = r.get("time_breakdown", {}).get("regenerations", [])
    regens = [g for g in regens if g["step"] > 1]  # the first set is made before the policy has learnt anything
    last = r["history"][-1]
    out = dict(q_real=last.get("q_real", np.nan), q_synthetic=last.get("q_synthetic", np.nan))
    if regens and "action_log_prob" in regens[0]:
        out.update(logp_synthetic=np.mean([g["action_log_prob"] for g in regens]),
                   logp_real=np.mean([g["real_action_log_prob"] for g in regens]))
    return out


def tabulate(args: Args, results: dict) -> str:
    """The score table (mean +- standard error over seeds) and the mechanism table."""
    lines = ["| agent | data | last score | best score | mean of last 5 evals | episode std at the end | last score by seed "
             "| wall time (min) | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    mech = ["| agent | data | log pi(a_syn) | log pi(a_real) | Q real | Q synthetic |", "|---|---|---|---|---|---|"]
    fmt = lambda m, se: f"{m:.1f} +- {se:.1f}"  # noqa: E731
    for s in args.scripts:
        for v in variants_of(args, s):
            rs = [results[(s, v, seed)] for seed in args.seeds if results.get((s, v, seed))]
            if not rs:
                continue
            last, best = mean_se([r["last_score"] for r in rs]), mean_se([r["best_score"] for r in rs])
            last5 = mean_se([np.mean([h["score_mean"] for h in r["history"][-5:]]) for r in rs])
            spread = np.mean([r["history"][-1].get("score_std", np.nan) for r in rs])  # across the last evaluation's episodes
            by_seed = ", ".join(f"{r['last_score']:.1f}" for r in rs)
            lines.append(f"| {s[:-3]} | {v} | {fmt(*last)} | {fmt(*best)} | {fmt(*last5)} | {spread:.1f} | {by_seed} | "
                         f"{np.mean([r['wall_time_s'] for r in rs]) / 60:.1f} | {len(rs)} |")
            ms = [mechanism(r) for r in rs]
            cell = lambda k, d=2: ("{:.{d}f} +- {:.{d}f}".format(*mean_se([m[k] for m in ms]), d=d)  # noqa: E731
                                   if all(np.isfinite(m.get(k, np.nan)) for m in ms) else "-")
            mech.append(f"| {s[:-3]} | {v} | {cell('logp_synthetic', 3)} | {cell('logp_real', 3)} | {cell('q_real')} | "
                        f"{cell('q_synthetic')} |")
    return ("\n".join(lines) + "\n\n(Scores: mean +- standard error over seeds; the episode std is the spread of the last "
            "evaluation's episodes, averaged over seeds: a large one marks an unstable policy.)\n\n"
            "Mechanism (mean +- standard error over seeds): action log-likelihood under the "
            "current policy of the synthetic sets after the first (made at step 1, before any learning) and of the real data at the same "
            "moments; the critics' mean min(Q1, Q2) on 4096 real and 4096 synthetic transitions at the last evaluation.\n\n"
            + "\n".join(mech))


def plot_figure4(args: Args, results: dict, path: str):
    """The paper's Figure 4 layout: one panel per agent, a bar per data variant, mean +- standard error of the last
    score over seeds, seeds as dots."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colours = dict(real="tab:gray", unguided="tab:blue", guided="tab:orange")
    panels = {}  # one panel per agent; DyDiff (TD3+BC) is one more bar in TD3+BC's panel
    for s in args.scripts:
        panels.setdefault(s.split("_")[-1][:-3], []).extend((s, v) for v in variants_of(args, s))
    colours["dydiff"] = "tab:purple"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False, sharey=True)
    for ax, (agent, bars) in zip(axes[0], panels.items()):
        for i, (s, v) in enumerate(bars):
            scores = [results[(s, v, seed)]["last_score"] for seed in args.seeds if results.get((s, v, seed))]
            if scores:
                m, se = mean_se(scores)
                ax.bar(i, m, yerr=se, color=colours.get(v, "tab:green"), capsize=4, alpha=0.85)
                ax.scatter([i] * len(scores), scores, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(bars)), [v for _, v in bars])
        ax.set_title(agent)
    axes[0][0].set_ylabel(f"{args.env_id}: normalised score (last)")
    fig.tight_layout()
    fig.savefig(f"{path}.tmp", format="png", dpi=120)
    plt.close(fig)
    os.replace(f"{path}.tmp", path)

if __name__ == "__main__":
    argv = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    main(tyro.cli(Args, args=argv))
