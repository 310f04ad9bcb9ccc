"""The paper's table as one sweep: datasets x agent scripts x data variants x seeds, run through submitit (a SLURM
cluster, or this machine), then its report: Table 1, Figure 4 and rliable's IQM with stratified-bootstrap 95% CIs.

    python sweep.py --launcher slurm --slurm-partition gpu --preset paper        # the whole table on a cluster
    python sweep.py --env-ids hopper-medium-replay-v2 --seeds 1 2 --jobs 2 -- --total-steps 100000   # small, local
    python sweep.py --report-only --env-ids ... --seeds ...                      # tabulate what has finished

Jobs. Per (dataset, seed) one *diffuser job* (`--diffuser-only`: trains the diffuser into the shared cache
`{runs_root}/diffusers`; the variants and both agents of that dataset and seed then load it), then the *agent jobs*
(SLURM: a job array that depends on the diffuser jobs, `afterok`; local: after they have finished, at most `--jobs`
at a time). Every run has its own `--runs-root` `{runs_root}/{env_id}/{script}__{variant}__{seed}`, is started with
`--resume --checkpoint-every N` and so continues from its last checkpoint when it is requeued after a preemption
(submitit's checkpointing resubmits the same command) or when the sweep is started again; a finished run
(results.json) is skipped. Flags after `--` go to every run (agent and diffuser jobs alike, so the diffuser cache key
matches).

Report (`{runs_root}/report/`): `table1.md` (rows = dataset, columns = agent x {real, unguided, guided}, last
normalised score mean +- standard error over seeds, the best of each agent's three in bold), `scores.csv` (one row
per run), `figure4.png` (per agent and variant: the mean over datasets of each seed's score, mean +- standard error
over seeds) and `iqm.md`/`iqm.png` (rliable: interquartile mean over all runs of each agent x variant, 95%
stratified-bootstrap confidence intervals).
"""
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import matplotlib
import numpy as np
import submitit
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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


COLORS = {"real": "tab:gray", "unguided": "tab:blue", "guided": "tab:red", "dydiff": "tab:purple"}  # in the figures
# the paper's locomotion grid: 3 MuJoCo envs x 4 D4RL levels (import them with collect_datasets.py)
PAPER_DATASETS = tuple(f"{env}-{level}-v2" for env in ("halfcheetah", "hopper", "walker2d")
                       for level in ("random", "medium", "medium-replay", "medium-expert"))


@dataclass
class Args:
    env_ids: tuple[str, ...] = PAPER_DATASETS
    """datasets (names of the shared dataset table)"""
    scripts: tuple[str, ...] = ("pgd_iql.py", "pgd_td3bc.py")
    """agent scripts (add dydiff_td3bc.py for DyDiff's row: its one variant, `dydiff`, trains its own state model in
    the agent job; `--preset` and the diffuser cache do not reach it)"""
    variants: tuple[str, ...] = ("real", "unguided", "guided")
    """data variants: real data only, unguided diffusion (SynthER-style), policy-guided diffusion"""
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    """seeds (the diffuser of a dataset is trained once per seed)"""
    preset: Literal["cpu", "paper"] = "cpu"
    """--preset of every run"""
    runs_root: str = "runs/sweep"
    """all runs, the shared diffuser cache, submitit's logs and the report go here"""
    checkpoint_every: int = 10_000
    """--checkpoint-every of the agent runs (what a preemption can cost at most)"""
    launcher: Literal["local", "slurm"] = "local"
    """`local`: submitit's local executor on this machine; `slurm`: sbatch job arrays"""
    jobs: int = 2
    """local: runs at the same time (each with one torch thread when more than one)"""
    slurm_partition: Optional[str] = None
    """SLURM partition"""
    slurm_account: Optional[str] = None
    """SLURM account"""
    slurm_qos: Optional[str] = None
    """SLURM quality of service"""
    gpus_per_node: int = 1
    """GPUs per job"""
    cpus_per_task: int = 8
    """CPUs per job"""
    mem_gb: int = 32
    """memory per job (GiB)"""
    timeout_min: int = 24 * 60
    """wall-time limit per job (minutes); a run that hits it is requeued and resumes from its checkpoint"""
    array_parallelism: int = 64
    """SLURM: agent jobs of the array running at the same time"""
    report_only: bool = False
    """run nothing: write the report of the runs that have finished"""
    dry_run: bool = False
    """print the jobs (and the SLURM parameters) that would be submitted, submit nothing"""
    bootstrap_reps: int = 2000
    """rliable: stratified-bootstrap resamples for the IQM confidence intervals"""
    extra: tuple[str, ...] = field(default_factory=tuple)
    """flags passed to every run (or put them after `--`)"""


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


RANGES = dict(checkpoint_every="[1, inf)", jobs="[1, inf)", gpus_per_node="[0, inf)",
              cpus_per_task="[1, inf)", mem_gb="[1, inf)", timeout_min="[1, inf)", array_parallelism="[1, inf)",
              bootstrap_reps="[1, inf)")


def check_args(args: Args):
    check_ranges(args, RANGES)
    if not args.env_ids or not args.seeds or not args.variants:
        raise SystemExit("error: --env-ids, --variants and --seeds must not be empty")
    check_scripts_and_flags(args)


# ------------------------------------------------------------------------------------------------------ jobs
@dataclass(frozen=True)
class Job:
    kind: str  # "diffuser" or "agent"
    env_id: str
    seed: int
    script: str
    variant: str = ""

    def root(self, runs_root: str) -> str:
        name = f"diffuser__{self.seed}" if self.kind == "diffuser" else f"{self.script[:-3]}__{self.variant}__{self.seed}"
        return os.path.join(runs_root, self.env_id.replace("/", "_"), name)

    def command(self, args: Args) -> list[str]:
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, self.script), "--env-id", self.env_id, "--seed", str(self.seed),
               "--runs-root", self.root(args.runs_root)]
        if self.script != DYDIFF:
            cmd += ["--preset", args.preset, "--diffuser-cache-dir", os.path.join(args.runs_root, "diffusers")]
        extra = flags_for(self.script, args.extra)
        if self.kind == "diffuser":
            return cmd + ["--exp-name", "diffuser", "--diffuser-only", *extra]
        return cmd + ["--exp-name", f"{self.script[:-3]}-{self.variant}", "--resume", "--checkpoint-every",
                      str(args.checkpoint_every), *extra, *VARIANTS.get(self.variant, [])]


def result_of(root: str) -> Optional[dict]:
    """results.json of the run under `root`, or None while it has not finished (or has failed: it is run again)."""
    if not os.path.isdir(root):
        return None
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "results.json")
        if os.path.isfile(path):
            results = json.load(open(path))
            if results.get("status") != "failed":
                return results
    return None


def plan(args: Args) -> tuple[list[Job], list[Job]]:
    """The diffuser jobs (one per dataset and seed that has a diffusion variant) and the agent jobs."""
    agents = [Job("agent", e, s, sc, v) for e in args.env_ids for s in args.seeds for sc in args.scripts
              for v in variants_of(args, sc)]
    pgd = [sc for sc in args.scripts if sc != DYDIFF]
    diffusers = [Job("diffuser", e, s, pgd[0]) for e in args.env_ids for s in args.seeds
                 if pgd and any(v != "real" for v in args.variants)]
    return diffusers, agents


class RunCommand(submitit.helpers.Checkpointable):
    """The callable submitit runs: one script command, output appended to a log. Checkpointable: when SLURM preempts
    or times out the job, submitit resubmits the same call (same command), and `--resume` continues the run from its
    checkpoint (the script writes one when the preemption signal arrives)."""

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads

    def __call__(self, cmd: list[str], log_path: str) -> int:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads else {})}
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if code:
            raise RuntimeError(f"exit {code}: {' '.join(cmd)} (log: {log_path})")
        return code


def slurm_parameters(args: Args, name: str, dependency: Optional[list[str]] = None) -> dict:
    """submitit AutoExecutor parameters of one SLURM submission."""
    extra = {"dependency": "afterok:" + ":".join(dependency)} if dependency else {}
    params = dict(name=name, timeout_min=args.timeout_min, gpus_per_node=args.gpus_per_node,
                  cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, slurm_array_parallelism=args.array_parallelism,
                  slurm_signal_delay_s=120)
    for key, value in (("slurm_partition", args.slurm_partition), ("slurm_account", args.slurm_account),
                       ("slurm_qos", args.slurm_qos)):
        if value:
            params[key] = value
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def submit_slurm(args: Args, diffusers: list[Job], agents: list[Job]):
    folder = os.path.join(args.runs_root, "submitit", "%j")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**slurm_parameters(args, "pgd-diffuser"))
    with executor.batch():
        d_jobs = [executor.submit(RunCommand(), j.command(args), j.root(args.runs_root) + ".log") for j in diffusers]
    ids = [j.job_id for j in d_jobs]
    executor.update_parameters(**slurm_parameters(args, "pgd-agent", ids))
    with executor.batch():
        a_jobs = [executor.submit(RunCommand(), j.command(args), j.root(args.runs_root) + ".log") for j in agents]
    print(f"submitted {len(d_jobs)} diffuser jobs ({', '.join(ids) or 'none'}) and an array of {len(a_jobs)} agent "
          f"jobs ({a_jobs[0].job_id.split('_')[0] if a_jobs else 'none'}); logs in {args.runs_root}")


def run_local(args: Args, diffusers: list[Job], agents: list[Job]):
    """submitit's local executor, at most --jobs runs at a time; diffusers first."""
    executor = submitit.AutoExecutor(folder=os.path.join(args.runs_root, "submitit", "%j"), cluster="local")
    executor.update_parameters(timeout_min=args.timeout_min, name="pgd")
    threads = 1 if args.jobs > 1 else None
    failed = []
    for stage, jobs in (("diffuser", diffusers), ("agent", agents)):
        pending, running, start = list(jobs), [], time.time()
        while pending or running:
            while pending and len(running) < args.jobs:
                job = pending.pop(0)
                running.append((job, executor.submit(RunCommand(threads), job.command(args),
                                                     job.root(args.runs_root) + ".log")))
            time.sleep(0.5)
            for job, handle in [r for r in running if r[1].done()]:
                running.remove((job, handle))
                try:
                    handle.result()
                    status = "done"
                except Exception as e:  # noqa: BLE001 - one failed run must not stop the others
                    failed.append(job)
                    status = f"FAILED ({str(e).splitlines()[0][:200]})"
                print(f"[sweep {time.time() - start:6.0f}s] {stage} {job.env_id} {job.script} {job.variant} seed "
                      f"{job.seed}: {status}", flush=True)
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed; see their .log files under {args.runs_root}; "
                         f"run the same command again to retry them (finished runs are skipped)")


# ---------------------------------------------------------------------------------------------------- report
def collect(args: Args) -> list[dict]:
    rows = []
    for job in plan(args)[1]:
        res = result_of(job.root(args.runs_root))
        if res is not None:
            rows.append(dict(env_id=job.env_id, script=job.script[:-3], variant=job.variant, seed=job.seed,
                             last_score=res["last_score"], best_score=res["best_score"],
                             wall_time_min=res["wall_time_s"] / 60))
    return rows


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def table1(args: Args, rows: list[dict]) -> str:
    columns = [(s[:-3], v) for s in args.scripts for v in variants_of(args, s)]
    head = "| dataset | " + " | ".join(f"{s} {v}" for s, v in columns) + " |"
    lines = [head, "|---|" + "---|" * len(columns)]
    for env_id in args.env_ids:
        cells = []
        for script in args.scripts:
            s, stats = script[:-3], {}
            for v in variants_of(args, script):
                scores = [r["last_score"] for r in rows if (r["env_id"], r["script"], r["variant"]) == (env_id, s, v)]
                stats[v] = (*mean_se(scores), len(scores)) if scores else None
            best = max((m for m in stats.values() if m), key=lambda m: m[0], default=None)
            for v in variants_of(args, script):
                m = stats[v]
                text = "-" if m is None else f"{m[0]:.1f} +- {m[1]:.1f}" + (f" ({m[2]})" if m[2] != len(args.seeds) else "")
                cells.append(f"**{text}**" if m is not None and m is best and len(stats) > 1 else text)
        lines.append(f"| {env_id} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_means(args: Args, rows: list[dict], script: str, variant: str) -> np.ndarray:
    """[seeds, datasets] last scores of one agent x variant; NaN where a run has not finished."""
    out = np.full((len(args.seeds), len(args.env_ids)), np.nan)
    for r in rows:
        if (r["script"], r["variant"]) == (script, variant):
            out[args.seeds.index(r["seed"]), args.env_ids.index(r["env_id"])] = r["last_score"]
    return out


def figure4(args: Args, rows: list[dict], path: str):
    scripts = [s[:-3] for s in args.scripts]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(scripts), 3.2))
    width, labelled = 0.8 / len(args.variants), set()
    for i, s in enumerate(scripts):
        variants = variants_of(args, s + ".py")
        for j, v in enumerate(variants):
            m = per_seed_means(args, rows, s, v)
            complete = m[~np.isnan(m).any(1)].mean(1)  # seeds with every dataset finished
            if len(complete):
                mean, se = mean_se(complete)
                ax.bar(i + (j - (len(variants) - 1) / 2) * width, mean, width, yerr=se, capsize=3,
                       color=COLORS[v], label=None if v in labelled else v)
                labelled.add(v)
    ax.set_xticks(range(len(scripts)), [s.replace("pgd_", "").upper().replace("TD3BC", "TD3+BC") for s in scripts])
    ax.set_ylabel("mean normalised score")
    ax.set_title(f"{len(args.env_ids)} dataset(s), {len(args.seeds)} seed(s): mean +- s.e. over seeds", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def iqm(args: Args, rows: list[dict], md_path: str, png_path: str) -> str:
    """rliable: IQM over all (seed, dataset) runs of each agent x variant, stratified-bootstrap 95% CIs."""
    from rliable import library as rly
    from rliable import metrics
    scores = {}
    for s in args.scripts:
        for v in variants_of(args, s):
            m = per_seed_means(args, rows, s[:-3], v)
            m = m[~np.isnan(m).any(1)]
            if len(m):
                scores[f"{s[:-3]} {v}"] = m / 100.0  # rliable's convention: normalised scores in [0, 1]
    if not scores:
        return "no agent x variant has every dataset finished for any seed yet"
    point, ci = rly.get_interval_estimates(scores, lambda x: np.array([metrics.aggregate_iqm(x)]),
                                           reps=args.bootstrap_reps)
    lines = ["| agent x variant | IQM | 95% CI | seeds |", "|---|---|---|---|"]
    for k in scores:
        lines.append(f"| {k} | {100 * point[k][0]:.1f} | [{100 * ci[k][0, 0]:.1f}, {100 * ci[k][1, 0]:.1f}] | "
                     f"{len(scores[k])} |")
    text = "\n".join(lines)
    fig, ax = plt.subplots(figsize=(6.5, 0.9 + 0.35 * len(scores)))
    for y, k in enumerate(scores):
        ax.plot([100 * ci[k][0, 0], 100 * ci[k][1, 0]], [y, y], lw=6, alpha=0.5,
                color=COLORS[k.rsplit(" ", 1)[1]])
        ax.plot(100 * point[k][0], y, "k|", ms=12)
    ax.set_yticks(range(len(scores)), list(scores))
    ax.invert_yaxis()
    ax.set_xlabel("IQM of the normalised score, 95% stratified-bootstrap CI")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    with open(md_path, "w") as f:
        f.write(text + "\n")
    return text


def report(args: Args) -> dict:
    rows = collect(args)
    out = os.path.join(args.runs_root, "report")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["env_id", "script", "variant", "seed", "last_score", "best_score",
                                               "wall_time_min"])
        writer.writeheader()
        writer.writerows(rows)
    table = table1(args, rows)
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write(f"Last normalised score, mean +- standard error over seeds {list(args.seeds)} (a count in brackets: "
                f"seeds finished so far); bold: the best of each agent's variants.\n\n{table}\n")
    figure4(args, rows, os.path.join(out, "figure4.png"))
    iqm_text = iqm(args, rows, os.path.join(out, "iqm.md"), os.path.join(out, "iqm.png"))
    print(f"{len(rows)} of {len(plan(args)[1])} runs finished\n\n{table}\n\n{iqm_text}\n\nreport: {out}")
    return dict(rows=rows, table=table, iqm=iqm_text, dir=out)


def main(args: Args) -> Optional[dict]:
    if "--" in sys.argv:
        args = dataclasses.replace(args, extra=tuple(sys.argv[sys.argv.index("--") + 1:]))
    check_args(args)
    if args.report_only:
        return report(args)
    diffusers, agents = plan(args)
    todo_d = [j for j in diffusers if result_of(j.root(args.runs_root)) is None]
    todo_a = [j for j in agents if result_of(j.root(args.runs_root)) is None]
    print(f"{len(diffusers) - len(todo_d)} of {len(diffusers)} diffuser jobs and {len(agents) - len(todo_a)} of "
          f"{len(agents)} agent runs finished already (skipped); {len(todo_d) + len(todo_a)} to run", flush=True)
    if args.dry_run:
        for j in todo_d + todo_a:
            print(" ".join(j.command(args)))
        if args.launcher == "slurm":
            print(slurm_parameters(args, "pgd-agent", ["<diffuser job ids>"]))
        return None
    try:
        os.makedirs(args.runs_root, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --runs-root {args.runs_root} ({e.strerror})") from None
    if args.launcher == "slurm":
        submit_slurm(args, todo_d, todo_a)
        return None
    run_local(args, todo_d, todo_a)
    return report(args)


if __name__ == "__main__":
    argv = sys.argv[1:sys.argv.index("--")] if "--" in sys.argv else sys.argv[1:]
    main(tyro.cli(Args, args=argv))
