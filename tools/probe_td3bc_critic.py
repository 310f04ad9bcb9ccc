"""Probe the critics of TD3+BC runs around their policy's actions, on the real data's states (issue #12's mechanism:
what drives the actor when the synthetic actions sit on the policy?).

Each argument is a finished run dir (written by `pgd_td3bc.py --save-model`: `agent.pt` + `results.json`) or a run
checkpoint (`checkpoint.pt` of `--checkpoint-every`, or a copy of one: the agent mid-training, with the synthetic set
it was training on). On `--states` real states s with data actions a_D drawn once (seed 0) from the run's dataset:
  q_pull        mean of lambda ||grad_a Q1(s, pi(s))||, lambda = alpha / mean |Q1(s, pi(s))|: the size of the actor
                loss's Q term per sample, in action units (what TD3+BC's actor step follows)
  bc_pull_real  mean of 2 ||pi(s) - a_D|| / act_dim: the BC term's pull per sample towards the data's action (on a
                synthetic batch that sits on the policy this pull is about zero)
  pi_data_sq    mean ||pi(s) - a_D||^2: how far the policy is from the data's actions
  twin_cos      mean cosine between grad_a Q1 and grad_a Q2 at pi(s): two critics trained on the same data agree on
                the direction to move the action where that direction is grounded in data, less where it is not
  twin_gap_pi   mean |Q1 - Q2| / mean |Q1| at pi(s); twin_gap_off: the same at clip(pi(s) + N(0, noise^2))
  q_drop_off    (mean Q1(s, pi(s)) - mean Q1(s, clip(pi(s) + N(0, noise^2)))) / mean |Q1|: how sharply Q peaks at the
                policy's actions
  saturated     share of the policy's action entries with |a| > 0.99 (tanh saturation)
and, for a checkpoint with a synthetic set, on `--states` of its transitions (s~, a~):
  pi_synth_sq   mean ||pi(s~) - a~||^2; bc_pull_synth: mean 2 ||pi(s~) - a~|| / act_dim (the BC pull on synthetic rows)

    python tools/probe_td3bc_critic.py runs/compare_halfcheetah/pgd_td3bc__{real,unguided,guided}__2/*/ \
        --names real unguided guided --out runs/probe_halfcheetah_s2.json
"""
import argparse
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pgd_td3bc  # noqa: E402

METRICS = ("q_pull", "bc_pull_real", "pi_data_sq", "twin_cos", "twin_gap_pi", "twin_gap_off", "q_drop_off",
           "saturated")
SYNTH_METRICS = ("pi_synth_sq", "bc_pull_synth")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="run dirs of pgd_td3bc.py --save-model runs (agent.pt, results.json) "
                                               "or run checkpoints (checkpoint.pt)")
    p.add_argument("--names", nargs="+", default=None, help="a label per run (default: its exp_name, seed and step)")
    p.add_argument("--states", type=int, default=4096, help="real states to probe on")
    p.add_argument("--noise", type=float, default=0.3, help="std of the off-policy action perturbation")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here (atomically)")
    args = p.parse_args(argv)
    if args.states <= 0 or not args.noise > 0:
        p.exit(2, f"error: --states and --noise must be positive (got {args.states}, {args.noise})\n")
    if args.names is not None and len(args.names) != len(args.run_dirs):
        p.exit(2, f"error: --names gives {len(args.names)} labels for {len(args.run_dirs)} run dirs; give one each\n")
    return args


def load_run(path: str) -> tuple[pgd_td3bc.Agent, dict]:
    """The agent of a finished pgd_td3bc.py --save-model run dir, or of a run checkpoint file, and a summary: env_id,
    exp_name, seed, step, last_score, synthetic (the checkpoint's synthetic set, else None)."""
    if os.path.isfile(path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state, run_args, history = ckpt["agent"], ckpt["args"], ckpt["history"]
        except Exception as e:
            raise SystemExit(f"error: cannot read the run checkpoint {path} ({type(e).__name__}); pass a checkpoint.pt "
                             f"of pgd_td3bc.py --checkpoint-every") from None
        info = dict(step=ckpt["step"], synthetic=ckpt.get("synthetic"))
    else:
        results_path, agent_path = os.path.join(path, "results.json"), os.path.join(path, "agent.pt")
        if not (os.path.isfile(results_path) and os.path.isfile(agent_path)):
            raise SystemExit(f"error: {path} has no results.json and agent.pt; pass the run dir of a finished "
                             f"pgd_td3bc.py run made with --save-model, or a checkpoint.pt")
        try:
            with open(results_path) as f:
                results = json.load(f)
            state = torch.load(agent_path, map_location="cpu", weights_only=True)
            run_args, history = results.get("args", {}), results.get("history", [])
        except Exception as e:
            raise SystemExit(f"error: cannot read {path} ({type(e).__name__}); rerun it with --save-model") from None
        info = dict(step=run_args.get("total_steps"), synthetic=None)
    if not isinstance(state, dict) or "actor_target.0.weight" not in state or "policy_noise" not in run_args:
        raise SystemExit(f"error: {path} is not of a pgd_td3bc.py run (this probe reads TD3+BC's twin critics only)")
    fields = {f.name for f in dataclasses.fields(pgd_td3bc.Args)}
    args = pgd_td3bc.Args(**{k: v for k, v in run_args.items() if k in fields})
    obs_dim, act_dim = state["obs_mean"].shape[0], state["actor.4.bias"].shape[0]
    agent = pgd_td3bc.make_agent(args, act_dim, dict(obs_mean=torch.zeros(obs_dim), obs_std=torch.ones(obs_dim)))
    agent.load_state_dict(state)  # the buffers carry the real normaliser
    info.update(env_id=args.env_id, exp_name=args.exp_name, seed=args.seed,
                last_score=history[-1]["score_mean"] if history else float("nan"))
    return agent.eval(), info


def gap_stats(gap: torch.Tensor) -> tuple[float, float]:
    """For policy-minus-batch action gaps [N, act_dim]: mean squared distance, and mean BC pull 2 ||gap|| / act_dim
    (the per-sample gradient of TD3+BC's mean-squared BC loss)."""
    return float((gap ** 2).sum(-1).mean()), float((2 * gap.norm(dim=-1) / gap.shape[-1]).mean())


def probe(agent: pgd_td3bc.Agent, obs: torch.Tensor, actions: torch.Tensor, noise: float,
          generator: torch.Generator) -> dict:
    """The METRICS of `agent` on real states `obs` with data actions `actions` (env units)."""
    s = agent.norm(obs)
    pi = agent.act(obs).detach().requires_grad_(True)
    q1, q2 = (q(torch.cat([s, pi], -1)).squeeze(-1) for q in (agent.q1, agent.q2))
    g1, = torch.autograd.grad(q1.sum(), pi, retain_graph=True)
    g2, = torch.autograd.grad(q2.sum(), pi)
    pi, q1, q2 = pi.detach(), q1.detach(), q2.detach()
    scale = q1.abs().mean()
    with torch.no_grad():
        off = (pi + noise * torch.randn(pi.shape, generator=generator)).clamp(-1, 1)
        sa_off = torch.cat([s, off], -1)
        q1_off, q2_off = agent.q1(sa_off).squeeze(-1), agent.q2(sa_off).squeeze(-1)
    pi_data_sq, bc_pull_real = gap_stats(pi - actions)
    return dict(q_pull=float(agent.alpha / scale * g1.norm(dim=-1).mean()), bc_pull_real=bc_pull_real,
                pi_data_sq=pi_data_sq,
                twin_cos=float(torch.nn.functional.cosine_similarity(g1, g2, dim=-1, eps=1e-12).mean()),
                twin_gap_pi=float((q1 - q2).abs().mean() / scale),
                twin_gap_off=float((q1_off - q2_off).abs().mean() / scale),
                q_drop_off=float((q1.mean() - q1_off.mean()) / scale),
                saturated=float((pi.abs() > 0.99).float().mean()))


@torch.no_grad()
def probe_synthetic(agent: pgd_td3bc.Agent, synthetic: dict, n: int) -> dict:
    """SYNTH_METRICS of `agent` on the first `n` transitions of a synthetic set (env units)."""
    sq, pull = gap_stats(agent.act(synthetic["obs"][:n].float()) - synthetic["actions"][:n].float())
    return dict(pi_synth_sq=sq, bc_pull_synth=pull)


def real_states(env_id: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` (state, action) pairs of the dataset, drawn without replacement with seed 0 (all of them if fewer)."""
    data = pgd_td3bc.transitions_from_episodes(pgd_td3bc.episodes_from_minari(pgd_td3bc.load_dataset(env_id)))
    idx = np.random.default_rng(0).permutation(len(data["obs"]))[:n]
    return (torch.as_tensor(data["obs"][idx], dtype=torch.float32),
            torch.as_tensor(data["actions"][idx], dtype=torch.float32))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    runs = [(path, *load_run(path)) for path in args.run_dirs]
    env_ids = {info["env_id"] for _, _, info in runs}
    if len(env_ids) != 1:
        raise SystemExit(f"error: the runs are of several datasets ({sorted(env_ids)}); probe one at a time")
    obs, actions = real_states(env_ids.pop(), args.states)
    rows = []
    for i, (path, agent, info) in enumerate(runs):
        name = args.names[i] if args.names else f"{info['exp_name']} seed {info['seed']} step {info['step']}"
        numbers = probe(agent, obs, actions, args.noise, torch.Generator().manual_seed(0))
        if info["synthetic"]:
            numbers.update(probe_synthetic(agent, info["synthetic"], args.states))
        if not all(math.isfinite(v) for v in numbers.values()):
            raise SystemExit(f"error: {path}'s agent gives non-finite values; its training diverged")
        rows.append(dict(name=name, path=path, step=info["step"], last_score=info["last_score"], **numbers))
    columns = METRICS + (SYNTH_METRICS if any(SYNTH_METRICS[0] in r for r in rows) else ())
    print("| run | step | last score | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r['name']} | {r['step']} | {r['last_score']:.1f} | "
              + " | ".join(f"{r[m]:.4g}" if m in r else "-" for m in columns) + " |")
    if args.out:
        try:
            pgd_td3bc.atomic_json(dict(states=len(obs), noise=args.noise, runs=rows), args.out)
        except OSError as e:
            raise SystemExit(f"error: cannot write {args.out} ({e.strerror}); pass a writable --out") from None


if __name__ == "__main__":
    main()
