"""Time the official JAX PGD sampler (EmptyJackson/policy-guided-diffusion) on this machine, for bench.py's sampler rows.

Runs the official code itself, from a checkout you pass (`--pgd-repo`); nothing of it is copied here. Random weights:
its U-Net (`models/diffusion.py` UNet(features, n_blocks)) and its IQL actor (`models/iql.py` TanhGaussianActor,
256x256) initialised by flax; its sampler (`diffusion/diffusion.py` make_sample_fn -> `diffusion/edm.py`
sample_trajectory: Heun + churn, action guidance by the policy's log-likelihood gradient, normalised) batched as its
rollout generator does (`jax.jit(jax.vmap(sample over rngs))`). The first call (XLA compilation) is excluded; the rate is
the best of `--repeats` timed calls. Also prints the network's parameters and FLOPs per trajectory-evaluation (XLA's
cost analysis of one batched U-Net call) so the rate can be compared per FLOP with bench.py's.

Not part of the harness's environment (JAX is not in requirements.txt); a separate venv:
    python -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install "jax[cpu]" flax optax distrax gym wandb
    git clone https://github.com/EmptyJackson/policy-guided-diffusion /tmp/pgd-official
    taskset -c 0 /tmp/jaxvenv/bin/python tools/bench_official_jax.py --pgd-repo /tmp/pgd-official --threads 1
(`--threads 1` sets XLA's CPU flags for one intra-op thread; pin the process with taskset as well, and run
`taskset -c 0 python bench.py --only sampler --threads 1` next to it for the same-machine comparison.)
"""
import argparse
import os
import sys
import time
from argparse import Namespace


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pgd-repo", required=True, help="checkout of EmptyJackson/policy-guided-diffusion")
    p.add_argument("--features", type=int, default=64, help="U-Net base features (official default 1024)")
    p.add_argument("--blocks", type=int, default=3, help="U-Net levels (official default 3)")
    p.add_argument("--steps", type=int, default=256, help="Heun steps (diffusion_timesteps)")
    p.add_argument("--batch", type=int, default=64, help="trajectories per jitted call (num_synth_workers)")
    p.add_argument("--horizon", type=int, default=32, help="rows per trajectory")
    p.add_argument("--obs-dim", type=int, default=17)
    p.add_argument("--act-dim", type=int, default=6)
    p.add_argument("--guidance-coef", type=float, default=1.0, help="0: unguided")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="1: XLA CPU flags for a single intra-op thread")
    return p.parse_args()


def main():
    args = parse_args()
    for name in ("features", "blocks", "steps", "batch", "horizon", "obs_dim", "act_dim", "repeats"):
        if getattr(args, name) <= 0:
            sys.exit(f"error: --{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    if not os.path.isfile(os.path.join(args.pgd_repo, "diffusion", "edm.py")):
        sys.exit(f"error: {args.pgd_repo} is not a checkout of EmptyJackson/policy-guided-diffusion "
                 "(no diffusion/edm.py); clone it and pass its path with --pgd-repo")
    sys.path.insert(0, os.path.abspath(args.pgd_repo))
    import jax
    import jax.numpy as jnp
    from diffusion.diffusion import create_denoiser_train_state, make_sample_fn
    from models.iql import TanhGaussianActor

    config = Namespace(  # the official defaults (util/args.py), the sizes from the command line
        num_features=args.features, num_blocks=args.blocks, batch_size=32, num_epochs=1, lr=2e-3,
        diffusion_method="edm", edm_p_mean=-1.2, edm_p_std=1.2, edm_sigma_data=1.0, edm_sigma_min=0.002,
        edm_sigma_max=80, edm_rho=7.0, edm_first_order=False, diffusion_timesteps=args.steps,
        edm_s_tmin=0.05, edm_s_tmax=50.0, edm_s_churn=80, edm_s_noise=1.003)
    rng = jax.random.PRNGKey(0)
    state = create_denoiser_train_state(rng, args.obs_dim, args.act_dim, config, 10_000)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    actor = TanhGaussianActor(args.act_dim)
    actor_params = actor.init(jax.random.PRNGKey(1), jnp.zeros((1, args.obs_dim)))
    channels = args.obs_dim + args.act_dim + 2
    stats = {k: {"mean": jnp.zeros(d), "std": jnp.ones(d)}
             for k, d in (("obs", args.obs_dim), ("action", args.act_dim), ("reward", 1), ("done", 1))}
    sample = make_sample_fn(config, True, False, False)

    def one(key, agent_params):
        return sample(rng=key, denoiser_state=state, seq_len=args.horizon, obs_dim=args.obs_dim,
                      action_dim=args.act_dim, denoiser_norm_stats=stats, policy_guidance_coeff=args.guidance_coef,
                      policy_guidance_cosine_coeff=0.3, agent_apply_fn=actor.apply, agent_params=agent_params)

    batched = jax.jit(jax.vmap(one, in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(2), args.batch)
    net = jax.jit(lambda x: state.apply_fn(state.params, x, jnp.zeros((1,))))
    cost = net.lower(jnp.ones((args.batch, args.horizon, channels))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

    t0 = time.perf_counter()
    jax.block_until_ready(batched(keys, actor_params))
    first = time.perf_counter() - t0
    times = []
    for i in range(args.repeats):
        keys = jax.random.split(jax.random.PRNGKey(3 + i), args.batch)
        t0 = time.perf_counter()
        jax.block_until_ready(batched(keys, actor_params))
        times.append(time.perf_counter() - t0)
    best = min(times)
    evals = 2 * args.steps  # Heun: two network calls per step (the last step's second call is computed and discarded)
    ms_eval = best / evals * 1e3
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, threads {args.threads or 'default'}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"official U-Net features {args.features} blocks {args.blocks}: {n_params / 1e6:.2f}M params, "
          f"{flops / 1e9:.2f} GFLOP per batched call ({args.batch} x {args.horizon} x {channels})")
    print(f"{'guided' if args.guidance_coef else 'unguided'} sampler, {args.steps} Heun steps: "
          f"{args.batch / best:.2f} traj/s, {best:.2f} s/batch, {ms_eval:.2f} ms/denoiser eval, "
          f"{flops / (ms_eval / 1e3) / 1e9:.1f} GFLOP/s, compile {first - best:.0f} s")


if __name__ == "__main__":
    main()
