"""Unit and end-to-end tests of pgd_iql.py and pgd_td3bc.py (imported as modules; scripts run by subprocess)."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pgd_iql  # noqa: E402
import pgd_td3bc  # noqa: E402
from conftest import assert_invalid_value_gives_one_line, write_tiny_dataset  # noqa: E402

SCRIPTS = [pgd_iql, pgd_td3bc]
OBS, ACT = 3, 2


def new_sampler(module, den, norm, obs_dim, act_dim, **kw):
    """The script's sampler with its Args defaults (eager, 32 steps) except `kw`."""
    defaults = module.Args(sampler_steps=32, compile=False)
    return module.GuidedEDMSampler(den, norm, obs_dim, act_dim,
                                   **{**{k: getattr(defaults, k) for k in module.SAMPLER_FIELDS}, **kw})


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, s^2) data per channel: D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""

    clean_known_input = False

    def __init__(self, mu, s):
        super().__init__()
        self.mu, self.s, self.calls = torch.as_tensor(mu), torch.as_tensor(s), 0

    def forward(self, x, sigma, known=None):
        self.calls += 1
        s2 = sigma.reshape(-1, 1, 1) ** 2
        return (self.s ** 2 * x + s2 * self.mu) / (self.s ** 2 + s2)


def identity_normalizer(module, channels):
    return module.Normalizer(torch.zeros(channels), torch.ones(channels))


# ---------------------------------------------------------------- EDM preconditioning and loss
def test_preconditioning_identities():
    sd = 0.5
    den = pgd_iql.EDMDenoiser(torch.nn.Identity(), sd)
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = den.preconditioning(sigma)
    # unit-variance network input: Var(c_in (y + n)) = c_in^2 (sd^2 + sigma^2) = 1
    torch.testing.assert_close(c_in ** 2 * (sd ** 2 + sigma ** 2), torch.ones_like(sigma))
    # unit-variance training target: ((1 - c_skip)^2 sd^2 + c_skip^2 sigma^2) / c_out^2 = 1
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, torch.ones_like(sigma))
    # the loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 is 1 / c_out^2
    torch.testing.assert_close((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2 * c_out ** 2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # limits: D -> x at sigma -> 0, D -> 0 (the data mean) at sigma -> inf for F = 0
    assert c_skip[0] > 0.9999 and c_skip[-1] < 1e-4


def test_edm_loss_is_zero_for_the_exact_denoiser_target():
    """With F equal to its training target the weighted loss is 0; with F = 0 it is E[target^2] ~ 1."""
    torch.manual_seed(0)
    x = torch.randn(4096, 4, 3) * 0.5
    zero_net = lambda x_in, c_noise: torch.zeros_like(x_in)  # noqa: E731
    loss = pgd_iql.edm_loss(pgd_iql.EDMDenoiser(zero_net, 0.5), x, -1.2, 1.2)
    assert abs(loss.item() - 1.0) < 0.05


def test_unet_shapes_and_zero_init():
    net = pgd_iql.TemporalUNet(7, 16, (1, 2, 2), 3)
    x = torch.randn(5, 8, 7)
    out = net(x, torch.zeros(5))
    assert out.shape == x.shape and torch.all(out == 0)  # zero-initialised output layer: D = c_skip x at init


# ---------------------------------------------------------------- sampler
def test_karras_schedule_and_guidance_schedule():
    t = pgd_iql.karras_sigmas(10, 0.002, 80.0, 7.0)
    assert len(t) == 11 and t[-1] == 0 and math.isclose(t[0], 80.0) and math.isclose(t[-2], 0.002, rel_tol=1e-9)
    assert torch.all(t[1:] < t[:-1])
    lam = pgd_iql.guidance_schedule(10, 2.0, 0.3)
    i = 3
    assert math.isclose(lam[i], 2.0 * (1 - i / 10 + 0.3 * math.sin(math.pi * (i + 1) / 10)))
    assert lam[-1] == 0 and torch.all(lam[:-1] > 0)


def test_step_takes_euler_step_from_churned_point_and_skips_correction_last():
    """With D = 0, d = x/t, so Algorithm 2 gives x_next = x_hat * t_next / t_hat where x_hat includes the churn noise.
    (Starting the Euler step from the pre-churn x, as the official JAX code does, fails this.)"""
    den = GaussianDenoiser(0.0, 0.0)
    sampler = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, 4), 1, 1, S_noise=1.0)
    x, noise = torch.randn(3, 4, 4), torch.randn(3, 4, 4)
    t_cur, t_next, gamma = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.4)
    t_hat = t_cur * (1 + gamma)
    x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * noise
    out = sampler.step(x, t_cur, t_next, gamma, torch.tensor(0.0), noise, None, last=False)
    torch.testing.assert_close(out, x_hat * t_next / t_hat)
    den.calls = 0
    out = sampler.step(x, t_cur, torch.tensor(0.0), gamma, torch.tensor(0.0), noise, None, last=True)
    assert den.calls == 1 and out.abs().max() < 1e-5
    # the official setting: the Euler step from the pre-churn x with the slope taken at x_hat (then Heun from x_hat)
    official = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, 4), 1, 1, S_noise=1.0, euler_from_churned=False)
    out = official.step(x, t_cur, torch.tensor(0.0), gamma, torch.tensor(0.0), noise, None, last=True)
    torch.testing.assert_close(out, x + (0 - t_hat) * x_hat / t_hat)


def official_sampler(den, norm, obs_dim, act_dim, n, horizon, gen, log_prob_fn, coef, steps, cosine=0.3):
    """The official JAX sampler's loop (its diffusion/edm.py sample_trajectory) transcribed step by step: guidance at
    the start of each step but the last on the noisy sample, unnormalised; Euler from the pre-churn point; Heun
    correction from the churned point; the same noise draws as GuidedEDMSampler."""
    rho, smin, smax = 7.0, 0.002, 80.0
    i = torch.arange(steps + 1, dtype=torch.float64)
    sig = (smax ** (1 / rho) + i / (steps - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sig[-1] = 0
    gam = torch.where((sig >= 0.05) & (sig <= 50), min(80 / steps, math.sqrt(2) - 1), 0.0)
    sig, gam = sig.float(), gam.float()
    shape = (n, horizon, norm.mean.shape[0])
    x = torch.randn(shape, generator=gen) * sig[0]
    a = slice(obs_dim, obs_dim + act_dim)
    for k in range(steps):
        eps = torch.randn(shape, generator=gen) * 1.003
        if k < steps - 1:
            lam = coef * (1 - k / steps + cosine * math.sin(math.pi * (k + 1) / steps))
            act = x[..., a].clone().requires_grad_(True)
            obs = norm.unnormalize(x)[..., :obs_dim]
            log_prob_fn(obs, torch.tanh(act * norm.std[a] + norm.mean[a])).sum().backward()
            x = x.clone()
            x[..., a] += lam * act.grad
        s, s_next, g = sig[k], sig[k + 1], gam[k]
        s_hat = s + g * s
        x_hat = x + (s_hat ** 2 - s ** 2).sqrt() * eps if g > 0 else x
        d = (x_hat - den(x_hat, s_hat)) / s_hat
        x_next = x + (s_next - s_hat) * d
        if s_next != 0:
            d2 = (x_next - den(x_next, s_next)) / (s_next + 1e-9)
            x_next = x_hat + 0.5 * (s_next - s_hat) * (d + d2)
        x = x_next.detach()
    return x


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_official_settings_reproduce_the_official_sampler(module):
    """euler_from_churned=False and normalize_guidance=False give the official sampler's samples, guided."""
    channels = OBS + ACT + 2
    den = GaussianDenoiser(torch.linspace(-0.5, 0.5, channels), torch.linspace(0.5, 1.5, channels))
    norm = module.Normalizer(torch.linspace(-1, 1, channels), torch.linspace(0.5, 2, channels))
    agent = make_policy_agent(module, 0.3)
    sampler = new_sampler(module, den, norm, OBS, ACT, sampler_steps=24, euler_from_churned=False,
                          normalize_guidance=False)
    ours = sampler(64, 9, torch.Generator().manual_seed(3), agent.log_prob, 0.05)
    ref = official_sampler(den, norm, OBS, ACT, 64, 9, torch.Generator().manual_seed(3), agent.log_prob, 0.05, 24)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    default = new_sampler(module, den, norm, OBS, ACT, sampler_steps=24)(64, 9, torch.Generator().manual_seed(3),
                                                                          agent.log_prob, 0.05)
    assert (default - ref).abs().max() > 1e-2  # this harness's defaults are not the official sampler


def test_sampler_recovers_gaussian_data_with_exact_denoiser():
    mu, s = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([0.5, 2.0, 1.0, 0.1])
    den = GaussianDenoiser(mu, s)
    sampler = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, 4), 2, 1, sampler_steps=40)
    x = sampler(4000, 4, torch.Generator().manual_seed(0)).reshape(-1, 4)
    assert den.calls == 2 * 40 - 1  # Heun: two evaluations per step, one on the last
    torch.testing.assert_close(x.mean(0), mu, atol=0.05, rtol=0)
    torch.testing.assert_close(x.std(0), s, atol=0, rtol=0.08)  # max churn at 40 steps inflates std by ~3%


def make_policy_agent(module, target_action: float):
    """An agent whose policy mean is `target_action` in every state."""
    args = module.Args(hidden_dim=8, total_steps=10)
    stats = dict(obs_mean=torch.zeros(OBS), obs_std=torch.ones(OBS), return_min=0.0, return_max=1.0)
    agent = module.make_agent(args, ACT, stats)
    with torch.no_grad():
        agent.actor[-1].weight.zero_()
        agent.actor[-1].bias.fill_(math.atanh(target_action))
        if hasattr(agent, "log_std"):
            agent.log_std.fill_(math.log(0.2))
    return agent


def guided_samples(module, log_prob_fn, coef, seed=0, n=512, **kw):
    channels = OBS + ACT + 2
    den = GaussianDenoiser(torch.zeros(channels), torch.ones(channels))
    sampler = new_sampler(module, den, identity_normalizer(module, channels), OBS, ACT, **kw)
    return sampler(n, 8, torch.Generator().manual_seed(seed), log_prob_fn, coef)


def test_inpainting_keeps_known_entries_exactly_at_every_step():
    """The inpainting hook (DyDiff's conditioning): the known entries (s_0 and every action) equal the given values at
    the start of every step and in the sample, the free entries are generated; the network sees the known entries
    clean after each Euler step."""
    channels, horizon = OBS + ACT + 2, 8
    den = GaussianDenoiser(torch.zeros(channels), torch.ones(channels))
    sampler = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, channels), OBS, ACT, sampler_steps=8)
    known = torch.zeros(1, horizon, channels, dtype=torch.bool)
    known[:, 0, :OBS], known[..., OBS:OBS + ACT] = True, True
    values = torch.randn(16, horizon, channels, generator=torch.Generator().manual_seed(1)) * 3
    seen, step = [], sampler.step_fn
    sampler.step_fn = lambda x, *a: seen.append(x.clone()) or step(x, *a)
    out = sampler(16, horizon, torch.Generator().manual_seed(0), inpaint=(known, values))
    assert len(seen) == sampler.num_steps - 1  # the last step runs sampler.step directly
    for x in seen + [out]:
        assert torch.equal(x[known.expand_as(x)], values[known.expand_as(values)])
    free = ~known.expand_as(out)
    assert not torch.allclose(out[free], values[free]) and torch.isfinite(out).all()
    plain = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, channels), OBS, ACT, sampler_steps=8)
    assert not torch.equal(plain(16, horizon, torch.Generator().manual_seed(0))[known.expand_as(out)],
                           out[known.expand_as(out)])


def test_edm_loss_gives_known_entries_clean():
    seen = []

    class Recorder(torch.nn.Module):
        sigma_data = 1.0

        def forward(self, x, sigma, known=None):
            seen.append(x.clone())
            return x

    x = torch.randn(4, 5, 3)
    known = torch.zeros(5, 3, dtype=torch.bool)
    known[0], known[:, 2] = True, True
    pgd_iql.edm_loss(Recorder(), x, -1.2, 1.2, known=known)
    assert torch.equal(seen[0][:, known], x[:, known]) and not torch.allclose(seen[0][:, ~known], x[:, ~known])


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_guidance_coef_zero_equals_unguided(module):
    agent = make_policy_agent(module, 0.5)
    torch.testing.assert_close(guided_samples(module, agent.log_prob, 0.0), guided_samples(module, None, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("guide_on_denoised", [False, True])
def test_guidance_moves_actions_toward_policy_mean(module, guide_on_denoised):
    agent = make_policy_agent(module, 0.5)
    kw = dict(guide_on_denoised=guide_on_denoised)
    unguided = guided_samples(module, None, 0.0, **kw)
    guided = guided_samples(module, agent.log_prob, 1.0, **kw)
    a_u, a_g = torch.tanh(unguided[..., OBS:OBS + ACT]), torch.tanh(guided[..., OBS:OBS + ACT])
    assert (a_g - 0.5).abs().mean() < 0.7 * (a_u - 0.5).abs().mean()
    with torch.no_grad():
        assert agent.log_prob(guided[..., :OBS], a_g).mean() > agent.log_prob(unguided[..., :OBS], a_u).mean() + 0.5
    # only the action channels are guided: observations keep the unguided distribution's scale
    assert abs(guided[..., :OBS].std() - unguided[..., :OBS].std()) < 0.1


def test_guidance_normalisation_is_per_trajectory_and_safe_at_zero():
    channels = OBS + ACT + 2
    sampler = new_sampler(pgd_iql, GaussianDenoiser(0.0, 1.0), identity_normalizer(pgd_iql, channels), OBS, ACT)
    x = torch.randn(4, 8, channels)
    out = sampler.guide(x, torch.tensor(1.0), torch.tensor(0.25),
                        lambda o, a: (3.0 * torch.arange(len(a))[:, None, None] * a).sum(-1))
    shift = (out - x)[..., OBS:OBS + ACT].flatten(1).norm(dim=1)
    assert shift[0] == 0  # zero gradient (trajectory 0): no step, no NaN, no eps offset
    torch.testing.assert_close(shift[1:], torch.full((3,), 0.25))  # g / (||g|| + eps): step length lambda
    assert torch.equal(out[..., :OBS], x[..., :OBS]) and torch.equal(out[..., OBS + ACT:], x[..., OBS + ACT:])


def test_guidance_gradient_matches_autograd_through_tanh_and_normaliser():
    channels = OBS + ACT + 2
    norm = pgd_iql.Normalizer(torch.linspace(-1, 1, channels), torch.linspace(0.5, 2, channels))
    agent = make_policy_agent(pgd_iql, 0.3)
    sampler = new_sampler(pgd_iql, GaussianDenoiser(0.0, 1.0), norm, OBS, ACT)
    x = torch.randn(2, 4, channels)
    a = x[..., OBS:OBS + ACT].clone().requires_grad_(True)
    obs = norm.unnormalize(x)[..., :OBS]
    action = torch.tanh(a * norm.std[OBS:OBS + ACT] + norm.mean[OBS:OBS + ACT])
    agent.log_prob(obs, action).sum().backward()
    torch.testing.assert_close(sampler.action_score(x, agent.log_prob), a.grad)


# ---------------------------------------------------------------- data: windows, normaliser, transitions
def fake_episodes(lengths, ends):
    """obs = [episode id, t, t^2]; ends: 'terminal' or 'timeout' per episode."""
    eps = []
    for k, (T, end) in enumerate(zip(lengths, ends)):
        t = np.arange(T + 1, dtype=np.float32)
        term, trunc = np.zeros(T, np.float32), np.zeros(T, np.float32)
        (term if end == "terminal" else trunc)[-1] = 1
        eps.append(dict(obs=np.stack([np.full(T + 1, k, np.float32), t, t ** 2], 1), actions=np.tanh(np.stack([t[:-1] / 50, -t[:-1] / 50], 1)),
                        rewards=t[:-1] * 0.1, terminals=term, timeouts=trunc))
    return eps


def test_windows_never_cross_episode_ends():
    eps = fake_episodes([20, 35, 5, 16], ["terminal", "timeout", "terminal", "timeout"])
    w = pgd_iql.make_windows(eps, horizon=8, stride=4)
    assert w.shape[1:] == (8, OBS + ACT + 2)
    assert np.all(w[:, :, 0] == w[:, :1, 0])  # one episode per window
    assert np.all(np.diff(w[:, :, 1], axis=1) == 1)  # consecutive time steps
    ends = {(int(e), int(t)) for e, t in w[:, -1, :2]}
    assert (0, 19) in ends  # the window ending on episode 0's terminal is kept (19 is not on the stride grid)
    assert (1, 34) not in ends and (3, 15) not in ends  # windows ending on a timeout are dropped
    assert not np.any(w[:, :, 0] == 2)  # episodes shorter than the horizon are skipped
    assert np.all(w[:, :-1, -1] == 0)  # terminals only on the last row


def test_normalizer_round_trip():
    w = np.random.default_rng(0).normal(3, 2, size=(50, 8, 5)).astype(np.float32)
    w[..., 4] = 1.0  # constant channel: std clamped, still invertible
    norm = pgd_iql.Normalizer.fit(w)
    x = torch.as_tensor(w)
    z = norm.normalize(x)
    torch.testing.assert_close(norm.unnormalize(z), x)
    assert abs(z[..., 0].mean()) < 1e-4 and abs(z[..., 0].std() - 1) < 1e-2


def test_transitions_from_windows_line_up_with_real_transitions():
    eps = fake_episodes([20, 30], ["terminal", "timeout"])
    w = torch.as_tensor(pgd_iql.make_windows(eps, horizon=8, stride=4))
    tr = pgd_iql.transitions_from_windows(w, OBS, ACT)
    real = pgd_iql.transitions_from_episodes(eps)
    real_keys = {tuple(np.round(np.concatenate([o, a, [r], n, [d]]), 4)) for o, a, r, n, d in
                 zip(real["obs"], real["actions"], real["rewards"], real["next_obs"], real["dones"])}
    for o, a, r, n, d in zip(*(tr[k].numpy() for k in ("obs", "actions", "rewards", "next_obs", "dones"))):
        if d:  # terminal: the next state is not used
            n = real["next_obs"][np.where((real["obs"] == o).all(1))[0][0]]
        assert tuple(np.round(np.concatenate([o, a, [r], n, [d]]), 4)) in real_keys
    live = tr["dones"] == 0
    assert torch.all(tr["next_obs"][live, 1] == tr["obs"][live, 1] + 1)  # s'_t == s_{t+1}
    assert tr["dones"].sum() == 1  # the terminal window's last row is kept
    # a window with a terminal in the middle keeps rows up to and including it
    x = w[:1].clone()
    x[0, 3, -1] = 1.0
    assert len(pgd_iql.transitions_from_windows(x, OBS, ACT)["obs"]) == 4


# ---------------------------------------------------------------- agents
def fit_actions(agent, steps: int = 400):
    """`steps` agent updates on a fixed batch whose actions are a smooth function of the observations; returns
    (obs, actions, the last losses, the actor's squared error to the actions before training)."""
    obs = torch.randn(256, OBS)
    actions = torch.tanh(obs[:, :ACT] * 0.8)
    batch = dict(obs=obs, actions=actions, rewards=torch.randn(256), next_obs=torch.randn(256, OBS), dones=torch.zeros(256))
    before = ((agent.act(obs) - actions) ** 2).mean().item()
    for _ in range(steps):
        losses = agent.update(batch)
    return obs, actions, losses, before


def test_td3bc_losses_and_bc_term_pulls_actor_to_dataset_actions():
    torch.manual_seed(0)
    args = pgd_td3bc.Args(hidden_dim=32, alpha=0.0, total_steps=400)  # alpha 0: the actor loss is pure BC
    stats = dict(obs_mean=torch.zeros(OBS), obs_std=torch.ones(OBS), return_min=0.0, return_max=1.0)
    agent = pgd_td3bc.make_agent(args, ACT, stats)
    obs, actions, losses, before = fit_actions(agent)
    assert set(losses) == {"losses/qf_loss", "losses/actor_loss", "losses/bc_loss"}
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    assert ((agent.act(obs) - actions) ** 2).mean().item() < 0.1 * before


def test_iql_update_shapes_and_awr_fits_actions():
    torch.manual_seed(0)
    args = pgd_iql.Args(hidden_dim=32, total_steps=400)
    stats = dict(obs_mean=torch.zeros(OBS), obs_std=torch.ones(OBS), return_min=0.0, return_max=10.0)
    agent = pgd_iql.make_agent(args, ACT, stats)
    assert agent.reward_scale == 100.0
    obs, actions, losses, before = fit_actions(agent)
    assert all(v.shape == () and torch.isfinite(v) for v in losses.values())
    assert ((agent.act(obs) - actions) ** 2).mean().item() < 0.2 * before
    assert agent.log_prob(obs, actions).shape == (256,)


def test_td3bc_update_counts_official_two_critic_steps_and_actor_every_step():
    stats = dict(obs_mean=torch.zeros(OBS), obs_std=torch.ones(OBS), return_min=0.0, return_max=1.0)
    for kw, critic_steps, actor_steps in ((dict(), 4, 2), (pgd_td3bc.AGENT_PAPER, 8, 4)):
        agent = pgd_td3bc.make_agent(pgd_td3bc.Args(hidden_dim=8, **kw), ACT, stats)
        fit_actions(agent, steps=4)
        q_state = agent.q_optimizer.state[agent.q1[0].weight]
        actor_state = agent.actor_optimizer.state[agent.actor[0].weight]
        assert (q_state["step"].item(), actor_state["step"].item()) == (critic_steps, actor_steps)
        assert agent.q_optimizer.defaults["eps"] == kw.get("adam_eps", 1e-8)


def test_iql_official_settings_constant_lr_no_reward_scale():
    stats = dict(obs_mean=torch.zeros(OBS), obs_std=torch.ones(OBS), return_min=0.0, return_max=10.0)
    cpu = pgd_iql.make_agent(pgd_iql.Args(hidden_dim=8, total_steps=10), ACT, stats)
    paper = pgd_iql.make_agent(pgd_iql.Args(hidden_dim=8, total_steps=10, **pgd_iql.AGENT_PAPER), ACT, stats)
    fit_actions(cpu, steps=5)
    fit_actions(paper, steps=5)
    assert cpu.actor_optimizer.param_groups[0]["lr"] < 3e-4 and paper.actor_optimizer.param_groups[0]["lr"] == 3e-4
    assert cpu.reward_scale == 100.0 and paper.reward_scale == 1.0
    with torch.no_grad():
        paper.log_std.fill_(-30.0)
    assert paper.dist(torch.zeros(1, OBS)).scale[0, 0].item() == pytest.approx(math.exp(-20))


# ---------------------------------------------------------------- argument validation (hypothesis)
@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_invalid_numeric_field_gives_one_line(module, data):
    assert_invalid_value_gives_one_line(module, {**module.RANGES, **module.AGENT_RANGES}, data.draw, st)


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
@settings(max_examples=30, deadline=None)
@given(sizes=st.fixed_dictionaries(dict(horizon=st.integers(2, 64), sampler_steps=st.integers(1, 8),
                                        num_synthetic=st.integers(1, 10 ** 6), batch_size=st.integers(1, 512),
                                        synthetic_ratio=st.floats(0, 1), ema_decay=st.floats(0, 0.9999),
                                        tau=st.floats(1e-4, 1), diffuser_warmup=st.floats(0, 1))))
def test_valid_tiny_configs_pass_validation(module, sizes):
    module.check_ranges(module.Args(**sizes), {**module.RANGES, **module.AGENT_RANGES})
    module.check_ranges(module.preset_args("paper", **sizes), {**module.RANGES, **module.AGENT_RANGES})


# ---------------------------------------------------------------- presets and configuration
# The official configuration (../shared/reference/official-pgd-config.md), as --print-config must show it.
OFFICIAL = dict(horizon=32, window_stride=8, val_fraction=0.05, sigma_data=1.0, sigma_min=0.002, sigma_max=80.0,
                rho=7.0, P_mean=-1.2, P_std=1.2, sampler_steps=256, S_churn=80.0, S_tmin=0.05, S_tmax=50.0,
                S_noise=1.003, euler_from_churned=False, normalize_guidance=False, guide_on_denoised=False,
                guidance_cosine=0.3, unet="plain", diffuser_channels=1024, diffuser_mults=[1, 2, 4],
                diffuser_kernel_size=3, diffuser_batch_size=32, diffuser_lr=2e-3, diffuser_warmup=0.1,
                diffuser_warmup_start=0.1, diffuser_epochs=10_000, ema_decay=0.995, ema_every=10, sample_horizon=129,
                num_synthetic=1_048_576, terminal_aware_transitions=False, regenerate_every=10_000, batch_size=256,
                synthetic_ratio=240 / 256, total_steps=1_000_000, learning_rate=3e-4, adam_eps=1e-5, gamma=0.99,
                tau=0.005, hidden_dim=256, eval_episodes=16)
OFFICIAL_AGENT = {"pgd_iql.py": dict(expectile=0.7, beta=3.0, exp_adv_max=100.0, log_std_min=-20.0,
                                     actor_cosine_lr=False, normalize_reward=False),
                  "pgd_td3bc.py": dict(alpha=2.5, policy_noise=0.2, noise_clip=0.5, critic_updates=2, policy_freq=1)}


def print_config(script, *flags):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags, "--print-config",
                        "--env-id", "no-such-dataset"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout), p.stderr


@pytest.mark.parametrize("script", ["pgd_iql.py", "pgd_td3bc.py"])
def test_print_config_paper_preset_has_the_official_values(script):
    config, _ = print_config(script, "--preset", "paper")
    expected = {**OFFICIAL, **OFFICIAL_AGENT[script]}
    assert {k: config[k] for k in expected} == expected
    module = pgd_iql if script == "pgd_iql.py" else pgd_td3bc
    assert set(config) == {f.name for f in dataclasses.fields(module.Args)}  # the keys are the Args fields
    cpu, _ = print_config(script)
    assert cpu["preset"] == "cpu" and cpu["sigma_data"] == 1.0 and cpu["sample_horizon"] == cpu["horizon"] == 32


def test_explicit_flag_beats_preset_and_paper_scale_is_an_alias():
    config, _ = print_config("pgd_iql.py", "--preset", "paper", "--sampler-steps", "64", "--sigma-data", "0.5")
    assert config["sampler_steps"] == 64 and config["sigma_data"] == 0.5 and config["num_synthetic"] == 1_048_576
    alias, err = print_config("pgd_iql.py", "--paper-scale", "--sampler-steps", "256")
    assert "deprecated" in err and alias["sampler_steps"] == 256
    paper, _ = print_config("pgd_iql.py", "--preset", "paper")
    assert alias.pop("paper_scale") and not paper.pop("paper_scale") and alias == paper
    assert pgd_iql.preset_args("paper", seed=3).sampler_steps == 256 and pgd_iql.Args().sigma_data == 1.0


def official_unet_params(data_dim, features, levels):
    """Parameter count of the official flax U-Net, layer by layer from its models/diffusion.py."""
    half = features // 8
    n = 2 * half * features + features + features * features + features  # time embedding: two Dense layers
    dims = [features * 2 ** i for i in range(levels)]
    c_prev = data_dim
    for c in dims:  # encoder: conv3, Dense(t), GroupNorm, conv3, GroupNorm
        n += 3 * c_prev * c + c + features * c + c + 2 * c + 3 * c * c + c + 2 * c
        c_prev = c
    for c in reversed(dims[:-1]):  # decoder: conv2, Dense(t), GroupNorm, conv3 (concat), GroupNorm, conv3, GroupNorm
        n += 2 * c_prev * c + c + features * c + c + 2 * c + 3 * 2 * c * c + c + 2 * c + 3 * c * c + c + 2 * c
        c_prev = c
    return n + c_prev * data_dim + data_dim  # 1x1 output conv


def test_paper_unet_is_the_official_size_built_on_meta():
    with torch.device("meta"):
        den = pgd_iql.build_denoiser(pgd_iql.PAPER, 25)
    count = sum(p.numel() for p in den.parameters())
    assert count == official_unet_params(25, 1024, 3) and 177e6 < count < 179e6
    small = pgd_iql.build_denoiser(dict(pgd_iql.PAPER, diffuser_channels=16), 7)
    assert sum(p.numel() for p in small.parameters()) == official_unet_params(7, 16, 3)
    x = torch.randn(2, 129, 7)
    assert small(x, torch.ones(2)).shape == x.shape


def test_129_row_sample_of_a_32_row_model_gives_128_transitions():
    channels = OBS + ACT + 2
    torch.manual_seed(0)
    for unet in ("residual", "plain"):
        den = pgd_iql.build_denoiser(dict(unet=unet, diffuser_channels=16, diffuser_mults=(1, 2, 4),
                                          diffuser_kernel_size=3, sigma_data=1.0), channels).requires_grad_(False)
        sampler = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, channels), OBS, ACT, sampler_steps=3)
        x = sampler(5, 129, torch.Generator().manual_seed(0))
        assert x.shape == (5, 129, channels) and torch.isfinite(x).all()
        x[..., -1] = -1.0  # no terminals
        x[1, 40, -1] = 1.0  # one terminal in the middle of trajectory 1
        official = pgd_iql.transitions_from_windows(x, OBS, ACT, terminal_aware=False)
        assert len(official["obs"]) == 5 * 128 and official["dones"].sum() == 1
        torch.testing.assert_close(official["next_obs"][:128], x[0, 1:, :OBS])
        ours = pgd_iql.transitions_from_windows(x, OBS, ACT)
        assert len(ours["obs"]) == 4 * 128 + 41  # trajectory 1 ends at its terminal


def test_shared_blocks_have_not_drifted():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import sync_shared
    assert sync_shared.drift() == []
    names = set(sync_shared.blocks(open(os.path.join(ROOT, "pgd_iql.py")).read()))
    assert {"imports", "args", "config", "validation", "dataset_ids", "minari_episodes", "datasets", "windows", "diffuser",
            "diffuser_training", "diffuser_loading", "diffuser_cache", "sampler", "synthetic", "evaluation", "run_dirs",
            "resume", "compiled_adam", "agent_compile", "main"} <= names
    assert names | {"td3bc"} == set(sync_shared.blocks(open(os.path.join(ROOT, "pgd_td3bc.py")).read()))
    dydiff = set(sync_shared.blocks(open(os.path.join(ROOT, "dydiff_td3bc.py")).read()))
    assert {"td3bc", "agent_compile", "sampler", "ensemble", "dydiff", "diffuser_training", "evaluation", "resume"} \
        <= dydiff  # DyDiff's agent
    assert not {"args", "config", "main", "synthetic", "diffuser_cache"} & dydiff  # is PGD's; its loop is its own
    assert "script_flags" in sync_shared.blocks(open(os.path.join(ROOT, "compare.py")).read()).keys() & \
        sync_shared.blocks(open(os.path.join(ROOT, "sweep.py")).read()).keys()  # their grids' scripts and flags
    for script in ("collect_datasets.py", "pets_baseline.py"):  # the dataset table every script copies
        assert "dataset_ids" in sync_shared.blocks(open(os.path.join(ROOT, script)).read())
    # no script carries shared code it never calls: toy2d trains but never loads or caches a diffuser, pets_baseline
    # loads but never trains one; neither makes an agent's synthetic set
    toy = set(sync_shared.blocks(open(os.path.join(ROOT, "toy2d.py")).read()))
    pets = set(sync_shared.blocks(open(os.path.join(ROOT, "pets_baseline.py")).read()))
    assert {"diffuser_training", "compiled_adam", "windows"} <= toy and not {"diffuser_loading", "diffuser_cache", "synthetic"} & toy
    assert "diffuser_loading" in pets and not {"diffuser_training", "windows", "diffuser_cache", "synthetic"} & pets
    assert not {"agent_compile", "resume"} & (toy | pets)  # no agent to compile or resume there


# ---------------------------------------------------------------- end to end (tiny local Minari dataset)
TINY = ["--env-id", "hopper-medium-replay", "--horizon", "8", "--diffuser-channels", "16", "--diffuser-mults", "1", "2",
        "--diffuser-steps", "100", "--sampler-steps", "6", "--total-steps", "200", "--num-synthetic", "1000",
        "--regenerate-every", "100", "--eval-every", "100", "--eval-episodes", "2", "--log-every", "50"]


def run_script(script, args, store, tmp_path, check=True):
    env = {**os.environ, "MINARI_DATASETS_PATH": store, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(ROOT, script), *args, "--runs-root", str(tmp_path / "runs"),
           "--diffuser-cache-dir", str(tmp_path / "diffusers")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def results(tmp_path):
    (run,) = (tmp_path / "runs").iterdir()
    return json.loads((run / "results.json").read_text()), run


@pytest.mark.parametrize("script", ["pgd_iql.py", "pgd_td3bc.py"])
@pytest.mark.parametrize("variant", [["--synthetic-ratio", "0"], ["--guidance-coef", "0"],
                                     ["--save-model", "--sample-horizon", "13"]],
                         ids=["real", "unguided", "guided"])
def test_end_to_end_tiny(script, variant, tiny_store, tmp_path):
    p = run_script(script, TINY + variant, tiny_store, tmp_path)
    res, run = results(tmp_path)
    assert [h["step"] for h in res["history"]] == [100, 200]
    assert np.isfinite(res["last_score"]) and res["best_score"] >= res["last_score"]
    assert "last score" in p.stdout and any(f.startswith("events.out.tfevents") for f in os.listdir(run))
    tb = res["time_breakdown"]  # where the wall time went
    assert {"data_loading_s", "diffuser_s", "sampling_s", "agent_updates_s", "updates_per_s", "evaluation_s"} <= set(tb)
    assert tb["agent_first_updates"] == 2 and 0 < tb["agent_first_updates_s"] <= tb["agent_updates_s"]
    assert len(tb["regenerations"]) == (0 if variant[0] == "--synthetic-ratio" else 2)  # at steps 1 and 101
    assert all(r["trajectories_per_s"] > 0 for r in tb["regenerations"]) and tb["updates_per_s"] > 0
    assert sum(tb[k] for k in ("data_loading_s", "diffuser_s", "sampling_s", "agent_updates_s", "evaluation_s")) \
        <= res["wall_time_s"] + 1e-6
    assert "time: data" in p.stdout and "updates/s" in p.stdout
    has_diffuser = bool(list((tmp_path / "diffusers").glob("*.pt"))) if (tmp_path / "diffusers").exists() else False
    assert has_diffuser == (variant[0] != "--synthetic-ratio")
    # the mechanism diagnostics: critics on real vs synthetic batches at every evaluation, the synthetic set's action
    # log-likelihood under the policy at every regeneration, and the diffuser's loss curve in the run dir
    assert all(np.isfinite(h["q_real"]) and ("q_synthetic" in h) == has_diffuser for h in res["history"])
    assert all(np.isfinite(r["action_log_prob"]) and np.isfinite(r["real_action_log_prob"]) for r in tb["regenerations"])
    assert (run / "diffuser_loss.png").is_file() == has_diffuser
    if has_diffuser:
        curve = json.loads((run / "diffuser_loss.json").read_text())
        assert [c["step"] for c in curve] == [0, 99] and all(np.isfinite(c["val_loss"]) for c in curve)
    if "--save-model" in variant:
        ckpt = torch.load(run / "policy.pt")
        assert ckpt["obs_dim"] == 11 and ckpt["act_dim"] == 3


def test_same_seed_same_numbers(tiny_store, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run_script("pgd_iql.py", TINY, tiny_store, a)
    run_script("pgd_iql.py", TINY + ["--diffuser-checkpoint", str(next((a / "diffusers").glob("*.pt")))], tiny_store, b)
    ha, hb = results(a)[0]["history"], results(b)[0]["history"]
    assert ha == hb
    # retraining the diffuser from scratch with the same seed gives the same weights
    c = tmp_path / "c"
    c.mkdir()
    run_script("pgd_iql.py", TINY, tiny_store, c)
    wa = torch.load(next((a / "diffusers").glob("*.pt")))["ema"]
    wc = torch.load(next((c / "diffusers").glob("*.pt")))["ema"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa) and results(c)[0]["history"] == ha


def test_run_dirs_are_unique_for_runs_started_in_the_same_second(tmp_path):
    args = pgd_iql.Args(runs_root=str(tmp_path))
    dirs = [pgd_iql.make_run_dir(args) for _ in range(3)]
    assert len(set(dirs)) == 3 and all(os.path.isdir(d) for d in dirs)


def test_rebuilt_dataset_under_the_same_id_gets_a_new_diffuser(minari_store, tmp_path):
    """The cache key covers the data: a dataset rebuilt under the same id is not served the old diffuser."""
    import minari
    fast = TINY + ["--diffuser-steps", "20", "--total-steps", "2", "--eval-every", "2", "--eval-episodes", "1",
                   "--num-synthetic", "50", "--regenerate-every", "2", "--sampler-steps", "2"]

    def build(seed):
        rng = np.random.default_rng(seed)
        write_tiny_dataset("mujoco/hopper/medium-replay-v0", "Hopper-v5", 600, 60,
                           lambda d: np.clip(rng.normal(0, 0.3, d), -1, 1), rng, (-20.272305, 3234.3))

    build(0)
    outputs = [run_script("pgd_iql.py", fast, str(minari_store), tmp_path).stdout]
    minari.delete_dataset("mujoco/hopper/medium-replay-v0")
    build(1)  # rebuilt with other content, same id
    outputs += [run_script("pgd_iql.py", fast, str(minari_store), tmp_path).stdout for _ in range(2)]
    assert ["training diffuser" in o for o in outputs] == [True, True, False]  # the third run reuses the second's
    assert len(list((tmp_path / "diffusers").glob("*.pt"))) == 2


def small_unet_samples(**kw) -> torch.Tensor:
    """Guided samples of a small random U-Net denoiser; the same noise on every call."""
    channels = OBS + ACT + 2
    torch.manual_seed(0)
    agent = make_policy_agent(pgd_iql, 0.5)
    den = pgd_iql.build_denoiser(dict(diffuser_channels=16, diffuser_mults=(1, 2), diffuser_kernel_size=3, sigma_data=1.0),
                                 channels).requires_grad_(False)
    torch.nn.init.normal_(den.net.out[-1].weight, std=0.1)
    sampler = new_sampler(pgd_iql, den, identity_normalizer(pgd_iql, channels), OBS, ACT, **kw)
    return sampler(64, 8, torch.Generator().manual_seed(0), agent.log_prob, 0.5)


def test_compiled_guided_sampler_matches_eager():
    """torch.compile(fullgraph=True) of the guided step (torch.func.grad inside) gives the eager samples."""
    compiled, eager = small_unet_samples(sampler_steps=4, compile=True), small_unet_samples(sampler_steps=4)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=2e-3)  # fused float ops differ slightly


def test_bf16_network_matches_fp32_samples():
    """--sampler-bf16 runs only F in bfloat16: with the same noise the samples stay close to float32's."""
    bf16, fp32 = small_unet_samples(sampler_steps=16, sampler_bf16=True), small_unet_samples(sampler_steps=16)
    assert not torch.equal(bf16, fp32)  # bf16 really ran
    rms = lambda t: t.pow(2).mean().sqrt()  # noqa: E731
    assert rms(bf16 - fp32) < 0.01 * rms(fp32)


def test_compile_flags_end_to_end(tiny_store, tmp_path):
    """--compile and --compile-agent (the 100-step run is below --compile-agent-min-steps, so that is lowered to 0): the
    whole script runs with the compiled diffuser training step, sampler and agent update (a one-level 4-channel U-Net
    keeps the compilation short)."""
    tiny = TINY[:TINY.index("--diffuser-channels")] + ["--diffuser-channels", "4", "--diffuser-mults", "1"] \
        + TINY[TINY.index("--diffuser-steps"):]
    p = run_script("pgd_iql.py", tiny + ["--compile", "--guidance-coef", "0", "--total-steps", "100", "--eval-every", "100",
                                         "--compile-agent-min-steps", "0"], tiny_store, tmp_path)
    res = results(tmp_path)[0]
    assert res["history"][-1]["step"] == 100 and res["args"]["compile_agent"] is True
    assert "with compilation" in p.stdout and res["time_breakdown"]["agent_first_updates"] == 2
    assert "steps, compiled" in p.stdout  # the diffuser's training step


@pytest.mark.parametrize("module", SCRIPTS, ids=["iql", "td3bc"])
def test_compiled_agent_update_matches_eager(module):
    """compile_agent (--compile-agent): the whole update in one graph per STEPS method gives the eager agent's
    weights, optimiser state and losses within float tolerance after 12 updates (IQL with its cosine actor schedule),
    and compiles each method once (the scheduled learning rate is a tensor: no recompilation per step)."""
    import torch._dynamo.utils
    stats = dict(obs_mean=torch.randn(OBS), obs_std=torch.rand(OBS) + 0.5, return_min=0.0, return_max=10.0)
    gen = torch.Generator().manual_seed(1)
    batches = [dict(obs=torch.randn(16, OBS, generator=gen), next_obs=torch.randn(16, OBS, generator=gen),
                    actions=torch.rand(16, ACT, generator=gen) * 2 - 1, rewards=torch.randn(16, generator=gen),
                    dones=(torch.rand(16, generator=gen) < 0.2).float()) for _ in range(12)]

    def train(compiled: bool):
        torch.manual_seed(0)
        agent = module.make_agent(module.Args(hidden_dim=32, total_steps=12), ACT, stats)
        if compiled:
            module.compile_agent(agent, torch.device("cpu"))
        torch.manual_seed(1)  # TD3+BC's smoothing noise
        losses = [{k: v.item() for k, v in agent.update(b).items()} for b in batches]
        return agent, losses

    eager, eager_losses = train(False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled, compiled_losses = train(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == len(module.Agent.STEPS)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    for name, optimizer in ((k, v) for k, v in vars(eager).items() if isinstance(v, torch.optim.Optimizer)):
        for p_eager, p_compiled in zip(optimizer.param_groups[0]["params"], getattr(compiled, name).param_groups[0]["params"]):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(getattr(compiled, name).state[p_compiled][key], optimizer.state[p_eager][key],
                                           rtol=1e-4, atol=1e-6)
    for a, b in zip(eager_losses, compiled_losses):
        assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-5) for k in a)
    torch.manual_seed(0)
    initial = module.make_agent(module.Args(hidden_dim=32, total_steps=12), ACT, stats)
    assert not torch.equal(compiled.actor[0].weight, initial.actor[0].weight)  # the compiled steps did train


def test_compiled_diffuser_training_matches_eager():
    """train_diffuser(compile=True) (--compile): loss, gradients and Adam in one graph give the eager model within
    float tolerance, with the warmup + cosine learning rate as a tensor (one graph, no recompilation per step)."""
    import torch._dynamo.utils
    args = pgd_iql.preset_args("cpu", horizon=8, diffuser_channels=4, diffuser_mults=(1,), diffuser_steps=20,
                               diffuser_batch_size=16)
    config = {k: getattr(args, k) for k in pgd_iql.DIFFUSER_FIELDS}
    windows = np.random.default_rng(0).normal(size=(200, 8, 5)).astype(np.float32)

    class NoWriter:
        def add_scalar(self, *a, **k):
            pass

    models = {}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for compiled in (False, True):
        torch.manual_seed(0)
        models[compiled] = pgd_iql.train_diffuser(config, windows, windows[:20], NoWriter(), torch.device("cpu"),
                                                  compile=compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    for k, v in models[False][0].state_dict().items():
        torch.testing.assert_close(models[True][0].state_dict()[k], v, rtol=1e-4, atol=1e-5)
    assert models[True][2][-1]["train_loss"] == pytest.approx(models[False][2][-1]["train_loss"], rel=1e-4)


def test_adam_step_eager_is_backward_and_step():
    """adam_step's eager path is bit for bit loss.backward() + Adam.step() (the scripts' eager agents did not change)."""
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 3) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [torch.optim.Adam(n.parameters(), lr=1e-2, eps=1e-5) for n in nets]
    x = torch.randn(8, 4)
    for _ in range(5):
        pgd_iql.adam_step(optimizers[0], nets[0](x).pow(2).mean())
        optimizers[1].zero_grad(set_to_none=True)
        nets[1](x).pow(2).mean().backward()
        optimizers[1].step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    assert all(p.grad is None for p in nets[0].parameters())


def test_compile_agent_default():
    """--compile-agent is on, but on CPU only for runs of at least --compile-agent-min-steps (compilation pays)."""
    resolve = lambda **kw: pgd_td3bc.resolve_compile_agent(pgd_td3bc.Args(**kw))  # noqa: E731
    assert resolve() and not resolve(total_steps=19_999) and resolve(total_steps=20_000)
    assert resolve(total_steps=10, compile_agent_min_steps=0) and not resolve(compile_agent=False)
    assert pgd_iql.preset_args("paper").total_steps >= pgd_iql.Args.compile_agent_min_steps


def test_bad_inputs_give_one_line_errors(tiny_store, tmp_path):
    p = run_script("pgd_iql.py", ["--env-id", "hopper-nonsense"], tiny_store, tmp_path, check=False)
    assert p.returncode != 0 and "unknown --env-id" in p.stderr and "Traceback" not in p.stderr
    for flag, value in (("--sample-horizon", "1"), ("--sampler-steps", "0"), ("--num-synthetic", "-1"),
                        ("--batch-size", "0"), ("--regenerate-every", "0"), ("--total-steps", "0")):
        p = run_script("pgd_td3bc.py", ["--env-id", "no-such-dataset", flag, value], tiny_store, tmp_path, check=False)
        assert p.returncode != 0 and f"{flag} {value} is outside" in p.stderr and "Traceback" not in p.stderr
    p = run_script("pgd_iql.py", TINY + ["--paper-scale", "--preset", "cpu"], tiny_store, tmp_path, check=False)
    assert p.returncode != 0 and "--preset paper" in p.stderr and "Traceback" not in p.stderr
    p = run_script("pgd_iql.py", TINY + ["--diffuser-checkpoint", str(tmp_path / "nope.pt")], tiny_store, tmp_path, check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "garbage.pt").write_bytes(os.urandom(4096))
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pt")
    for bad in ("garbage.pt", "other.pt"):
        p = run_script("pgd_iql.py", TINY + ["--diffuser-checkpoint", str(tmp_path / bad)], tiny_store, tmp_path, check=False)
        assert p.returncode != 0 and "not a readable diffuser checkpoint" in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and "weights_only=False" not in p.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "pgd_iql.py"), *TINY, "--runs-root", str(blocker / "runs")],
                       env={**os.environ, "MINARI_DATASETS_PATH": tiny_store}, capture_output=True, text=True)
    assert p.returncode != 0 and "--runs-root" in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- preemption: checkpoint, SIGTERM, --resume
def flags_with(base: list[str], **overrides) -> list[str]:
    """`base` (a flat flag list) with `--name value` pairs replaced or added."""
    out = list(base)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


@pytest.mark.parametrize("script", ["pgd_iql.py", "pgd_td3bc.py"])
def test_sigterm_then_resume_gives_the_uninterrupted_numbers(script, tiny_store, tmp_path):
    flags = flags_with(TINY, total_steps=600, regenerate_every=200, eval_every=100, checkpoint_every=50)
    whole = run_script(script, flags, tiny_store, tmp_path / "whole")
    (run,) = (tmp_path / "whole" / "runs").iterdir()
    expected = json.loads((run / "results.json").read_text())
    assert not (run / "checkpoint.pt").exists() and "resumed" not in whole.stdout

    root = tmp_path / "cut"
    env = {**os.environ, "MINARI_DATASETS_PATH": tiny_store, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, os.path.join(ROOT, script), *flags, "--runs-root", str(root / "runs"),
           "--diffuser-cache-dir", str(tmp_path / "whole" / "diffusers"), "--resume"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((root / "runs").glob("*/checkpoint.pt")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "continue with --resume" in out
    (cut,) = (root / "runs").iterdir()
    assert (cut / "checkpoint.pt").exists() and not (cut / "results.json").exists()
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    step = ckpt["step"]
    assert 50 <= step < 600 and ckpt["wall_time_s"] > 0
    torch.save({**ckpt, "wall_time_s": 1000.0}, cut / "checkpoint.pt")  # as if the first sitting had taken 1000 s

    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    sitting = time.time() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"resumed {cut} at step {step + 1}" in p.stdout
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["history"] == expected["history"] and resumed["last_score"] == expected["last_score"]
    assert resumed["resumed_from_step"] == step and not (cut / "checkpoint.pt").exists()
    assert 1000 < resumed["wall_time_s"] <= 1000 + sitting  # the earlier sitting's wall time is counted
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # finished: reported, not rerun
    assert again.returncode == 0 and "finished already" in again.stdout and len(list((root / "runs").iterdir())) == 1


def test_corrupt_run_checkpoint_is_one_line(tiny_store, tmp_path):
    run = tmp_path / "runs" / "hopper-medium-replay__pgd_iql__1__123"
    run.mkdir(parents=True)
    (run / "checkpoint.pt").write_bytes(os.urandom(2000))
    p = run_script("pgd_iql.py", TINY + ["--resume"], tiny_store, tmp_path, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "cannot read the run checkpoint" in p.stderr.strip().splitlines()[-1]


def test_diffuser_only_trains_the_cache_and_stops(tiny_store, tmp_path):
    p = run_script("pgd_td3bc.py", TINY + ["--diffuser-only", "--synthetic-ratio", "0"], tiny_store, tmp_path)
    res, _ = results(tmp_path)
    assert res["diffuser_only"] and "history" not in res and "diffuser of" in p.stdout
    assert len(list((tmp_path / "diffusers").glob("*.pt"))) == 1
    p = run_script("pgd_iql.py", TINY, tiny_store, tmp_path)  # another agent script reuses it from the cache
    assert "loaded diffuser" in p.stdout and "saved diffuser" not in p.stdout, p.stdout[-2000:]


def test_compare_runs_the_grid_then_reports_mean_and_standard_error(tiny_store, tmp_path):
    """compare.py end to end: runs each (variant, seed) once, skips finished runs when called again, and writes the
    table (mean +- standard error over seeds), the mechanism table and the Figure 4 PNG."""
    env = {**os.environ, "MINARI_DATASETS_PATH": tiny_store, "PYTHONUNBUFFERED": "1"}
    flags = [a for a in TINY if a not in ("--env-id", "hopper-medium-replay")]
    flags = flags[:flags.index("--total-steps")] + ["--total-steps", "100"] + flags[flags.index("--total-steps") + 2:]
    out = tmp_path / "docs" / "compare.md"
    dydiff = ["--dynamics-steps", "40", "--dynamics-hidden", "16", "--ensemble-size", "2", "--num-elites", "1",
              "--rollout-every", "50", "--rollout-batch", "32"]  # DyDiff's own flags; PGD's never reach it
    cmd = [sys.executable, os.path.join(ROOT, "compare.py"), "--env-id", "hopper-medium-replay", "--scripts",
           "pgd_td3bc.py", "dydiff_td3bc.py", "--variants", "real", "guided", "--seeds", "1", "2", "--runs-root",
           str(tmp_path / "runs"), "--out", str(out), "--", *flags, *dydiff, "--guidance-coef", "0.2", "--diffuser-cache-dir",
           str(tmp_path / "diffusers")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    runs = {d.name: json.loads(next(d.glob("*/results.json")).read_text()) for d in (tmp_path / "runs").iterdir()
            if d.is_dir()}
    assert sorted(runs) == [f"dydiff_td3bc__dydiff__{s}" for s in (1, 2)] + \
        [f"pgd_td3bc__{v}__{s}" for v in ("guided", "real") for s in (1, 2)]
    assert all(len(runs[f"dydiff_td3bc__dydiff__{s}"]["time_breakdown"]["regenerations"]) == 2 for s in (1, 2))
    # the variant's flags win over the shared ones: the guided runs take --guidance-coef, the real runs stay real
    assert runs["pgd_td3bc__guided__1"]["args"]["guidance_coef"] == 0.2
    assert runs["pgd_td3bc__real__1"]["args"]["synthetic_ratio"] == 0
    last = [runs[f"pgd_td3bc__guided__{s}"]["last_score"] for s in (1, 2)]
    se = np.std(last, ddof=1) / np.sqrt(2)
    text = out.read_text()
    assert f"| pgd_td3bc | guided | {np.mean(last):.1f} +- {se:.1f} |" in text
    assert "log pi(a_syn)" in text and "| dydiff_td3bc | dydiff |" in text
    assert (tmp_path / "docs" / "compare.png").stat().st_size > 1000
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and "td3bc.py --env-id" not in again.stdout  # nothing rerun
    typo = subprocess.run(cmd[:-2] + ["--no-such-flag", "1"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert typo.returncode != 0 and "--no-such-flag" in typo.stderr and "Traceback" not in typo.stderr
    assert f"| pgd_td3bc | guided | {np.mean(last):.1f} +- {se:.1f} |" in again.stdout


def test_compare_table_columns_last5_spread_and_seeds():
    """compare.py's score table: last and best (mean +- standard error), the mean of each run's last 5 evaluations,
    the last evaluation's episode spread averaged over seeds, and each seed's last score."""
    import compare
    def run(scores, stds):
        history = [dict(step=i + 1, score_mean=m, score_std=s) for i, (m, s) in enumerate(zip(scores, stds))]
        return dict(last_score=scores[-1], best_score=max(scores), history=history, wall_time_s=600.0)
    results = {("pgd_td3bc.py", "guided", 1): run([0, 0, 10, 20, 30, 40, 50], [9, 9, 9, 9, 9, 9, 2]),
               ("pgd_td3bc.py", "guided", 2): run([0, 0, 0, 0, 0, 35, 30], [1, 1, 1, 1, 1, 1, 4])}
    args = compare.Args(scripts=("pgd_td3bc.py",), variants=("guided",), seeds=(1, 2))
    row = next(line for line in compare.tabulate(args, results).splitlines() if line.startswith("| pgd_td3bc | guided"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["40.0 +- 10.0", "42.5 +- 7.5", "21.5 +- 8.5", "3.0", "50.0, 30.0", "10.0", "2"]
