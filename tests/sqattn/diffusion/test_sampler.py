"""Noise schedules, the eps loss and the DDIM + CFG sampler (sqattn/diffusion)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqattn.diffusion import (cfg_eps, cosine_schedule, ddim_rollout, ddim_sample, ddim_step, ddim_timesteps,
                              eps_loss, linear_schedule)
from sqattn.diffusion.schedule import add_noise, make_schedule
from sqattn.models.dit import DiT
from tests.testing import assert_close


def _tiny_dit(seed=0):
    m = DiT(image_size=8, patch=4, d_model=16, depth=1, num_heads=2, text_layers=1, rngs=nnx.Rngs(seed))
    # the output layer starts at zero (eps = 0); give it weights so samples depend on the noise and prompt
    m.out.kernel.value = jax.random.normal(jax.random.key(seed + 1), m.out.kernel.value.shape) * 0.3
    for blk in m.layers:
        blk.ada.bias.value = jnp.ones_like(blk.ada.bias.value) * 0.5    # open the adaLN-Zero gates
    return m


def test_schedules_are_decreasing_in_unit_interval():
    for s in (cosine_schedule(1000), linear_schedule(1000)):
        ab = s.alphas_cumprod
        assert ab.shape == (1000,) and np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
    assert cosine_schedule(1000).alphas_cumprod[-1] < 1e-4          # ends in (almost) pure noise
    assert float(cosine_schedule().alpha_bar(jnp.array(-1))) == 1.0
    with pytest.raises(ValueError, match="unknown noise schedule 'nope'"):
        make_schedule("nope")


def test_trailing_timesteps():
    ts = ddim_timesteps(1000, 20)
    assert ts[0] == 999 and ts[-1] == 49 and np.all(np.diff(ts) == -50)
    with pytest.raises(ValueError, match="num_sample_steps must be in"):
        ddim_timesteps(1000, 0)


def test_ddim_with_oracle_eps_recovers_the_clean_image():
    # Given: the exact noise of x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, every DDIM step maps onto x0's trajectory.
    sched = cosine_schedule(1000)
    x0 = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3), minval=-0.9, maxval=0.9)
    noise = jax.random.normal(jax.random.key(1), x0.shape)

    def oracle(x, t, ctx):
        ab = sched.alpha_bar(t).reshape(-1, 1, 1, 1)
        return (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    x_T = add_noise(sched, x0, jnp.full((3,), 999), noise)
    out = jax.jit(lambda n: ddim_sample(oracle, sched, n, None, num_steps=10))(x_T)
    assert_close(out, x0, rtol=1e-4, mtol=1e-3, name="x0")


def test_ddim_is_deterministic_given_the_noise_and_cfg1_is_conditional():
    m = _tiny_dit()
    sched = cosine_schedule(1000)
    tok = jnp.array([[1, 2, 5, 0, 0, 0], [1, 4, 8, 0, 0, 0]], jnp.int32)
    unc = jnp.zeros_like(tok)
    eps_fn = lambda x, t, c: m(x, t, c)   # noqa: E731

    @jax.jit
    def sample(noise, w):
        return ddim_sample(eps_fn, sched, noise, tok, unc, num_steps=4, guidance=w)

    @jax.jit
    def sample_cond(noise):
        return ddim_sample(eps_fn, sched, noise, tok, None, num_steps=4)

    n1 = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    n2 = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    a, b, c = sample(n1, 3.0), sample(n1, 3.0), sample(n2, 3.0)
    assert np.array_equal(np.asarray(a), np.asarray(b))                 # same noise: the same samples
    assert float(jnp.max(jnp.abs(a - c))) > 1e-2                         # other noise: other samples
    assert float(jnp.max(jnp.abs(sample(n1, 1.0) - a))) > 1e-3         # the guidance scale matters
    # guidance scale 1 equals the conditional prediction (eps_u + 1 (eps_c - eps_u) = eps_c up to rounding)
    x, t = n1, jnp.full((2,), 500)
    assert_close(cfg_eps(eps_fn, x, t, tok, unc, 1.0), eps_fn(x, t, tok), name="cfg1 eps")
    assert_close(sample(n1, 1.0), sample_cond(n1), name="cfg1 samples", rtol=1e-4, mtol=1e-3)


def test_rollout_is_the_first_n_steps_of_the_sampler():
    m = _tiny_dit()
    sched = cosine_schedule(1000)
    tok = jnp.array([[1, 3, 6, 0, 0, 0]], jnp.int32)
    eps_fn = lambda x, t, c: m(x, t, c)   # noqa: E731
    noise = jax.random.normal(jax.random.key(2), (1, 8, 8, 3))
    ts = ddim_timesteps(1000, 4)
    x_n, t_n = jax.jit(lambda z: ddim_rollout(eps_fn, sched, z, tok, jnp.zeros_like(tok), jnp.int32(3),
                                              num_steps=4, guidance=2.0))(noise)
    assert int(t_n) == ts[3]
    eps = cfg_eps(eps_fn, x_n, jnp.full((1,), ts[3]), tok, jnp.zeros_like(tok), 2.0)
    last = ddim_step(sched, x_n, eps, ts[3], -1)
    full = ddim_sample(eps_fn, sched, noise, tok, jnp.zeros_like(tok), num_steps=4, guidance=2.0)
    assert_close(last, full, name="rollout + last step", rtol=1e-4, mtol=1e-3)


def test_eps_loss_is_zero_for_the_oracle():
    sched = cosine_schedule(1000)
    x0 = jax.random.uniform(jax.random.key(0), (4, 4, 4, 3), minval=-1, maxval=1)
    rng = jax.random.key(3)
    k_t, k_e = jax.random.split(rng)
    eps_true = jax.random.normal(k_e, x0.shape)
    per, t = eps_loss(lambda x, t: eps_true, sched, x0, rng)
    assert per.shape == (4,) and float(jnp.max(per)) == 0.0 and t.shape == (4,)
    per_zero, _ = eps_loss(lambda x, t: jnp.zeros_like(x), sched, x0, rng)
    assert_close(per_zero, jnp.mean(eps_true ** 2, axis=(1, 2, 3)), name="mse of zero prediction")


def test_min_snr_weight_against_hand_values():
    from sqattn.diffusion.schedule import Schedule, min_snr_weight
    sched = Schedule(np.array([0.99, 0.9, 0.5, 0.1], np.float32))        # SNR 99, 9, 1, 1/9
    w = np.asarray(min_snr_weight(sched, jnp.arange(4), 5.0))
    np.testing.assert_allclose(w, [5 / 99, 5 / 9, 1.0, 1.0], rtol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weight(sched, jnp.arange(4), 0.0)


def test_diffusion_task_weights_the_training_loss_but_reports_the_plain_mse():
    from sqattn import configs
    from sqattn.diffusion.schedule import min_snr_weight
    from sqattn.diffusion.tasks import DiffusionTask
    model = _tiny_dit()
    batch = {"images": jax.random.uniform(jax.random.key(1), (6, 8, 8, 3), minval=-1, maxval=1),
             "tokens": jnp.ones((6, 6), jnp.int32)}
    rng = jax.random.key(5)
    cfg = configs.get("dit_shapes:runlocal=True,minsnr=0")
    plain, weighted = DiffusionTask(), DiffusionTask()
    plain.make_datasets(cfg)
    cfg.diffusion.min_snr_gamma = 5.0
    weighted.make_datasets(cfg)
    lp, mp = plain.loss_fn(model, batch, rng)
    lw, mw = weighted.loss_fn(model, batch, rng)
    per, t = eps_loss(lambda x, t: model(x, t, batch["tokens"]), weighted.schedule, batch["images"], rng)
    assert_close(lp, jnp.mean(per), name="plain loss")
    assert_close(mw["eps_mse"], mp["eps_mse"], name="reported mse")
    assert_close(lw, jnp.mean(per * min_snr_weight(weighted.schedule, t, 5.0)), name="weighted loss")
