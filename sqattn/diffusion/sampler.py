"""DDIM sampling (Song et al. 2021, eta = 0) with classifier-free guidance, compiled as one ``lax.scan``.

``eps_fn(x, t, ctx) -> eps`` is the denoiser (x [b,...], t [b] int timesteps, ctx the conditioning pytree).
With guidance scale w, ``cfg_eps`` returns eps_u + w (eps_c - eps_u) from two calls (conditional ctx and
unconditional ctx_u; w = 1 gives the conditional prediction up to rounding). The S sampling timesteps are
"trailing" (``ddim_timesteps``): t_i = round(T - i T / S) - 1, i = 0 .. S-1, so the first step starts at
t = T-1 (pure noise at the cosine schedule's end) and the last goes to the clean image. Deterministic: the
output is a function of the initial noise (and the parameters) only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sqattn.diffusion.schedule import Schedule


def ddim_timesteps(num_train_steps: int, num_sample_steps: int) -> np.ndarray:
    """int32 [S]: the trailing DDIM timesteps, descending from T - 1."""
    if not 1 <= num_sample_steps <= num_train_steps:
        raise ValueError(f"num_sample_steps must be in [1, {num_train_steps}], got {num_sample_steps}")
    i = np.arange(num_sample_steps)
    return (np.round(num_train_steps - i * num_train_steps / num_sample_steps) - 1).astype(np.int32)


def cfg_eps(eps_fn, x, t, ctx, ctx_uncond, scale: float):
    """Classifier-free guided eps: eps_u + scale (eps_c - eps_u)."""
    eps_c = eps_fn(x, t, ctx)
    if ctx_uncond is None:
        return eps_c
    eps_u = eps_fn(x, t, ctx_uncond)
    return eps_u + scale * (eps_c - eps_u)


def ddim_step(schedule: Schedule, x: jax.Array, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              clip_x0: float | None = 1.0) -> jax.Array:
    """One deterministic DDIM update from timestep t to t_prev (t_prev = -1: the clean image)."""
    ab, ab_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x0 = (x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
    return jnp.sqrt(ab_prev) * x0 + jnp.sqrt(1.0 - ab_prev) * eps


def _step_fn(eps_fn, schedule, timesteps, ctx, ctx_uncond, guidance, clip_x0):
    ts = jnp.asarray(timesteps, jnp.int32)
    prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])

    def step(x, i):
        b = x.shape[0]
        t = jnp.broadcast_to(ts[i], (b,))
        eps = cfg_eps(eps_fn, x, t, ctx, ctx_uncond, guidance)
        return ddim_step(schedule, x, eps, ts[i], prev[i], clip_x0)
    return step


def ddim_sample(eps_fn, schedule: Schedule, noise: jax.Array, ctx, ctx_uncond=None, *, num_steps: int = 20,
                guidance: float = 3.0, clip_x0: float | None = 1.0) -> jax.Array:
    """x_0 [b, ...] from the initial noise x_T [b, ...]: ``num_steps`` DDIM steps as one ``lax.scan``.

    Args:
      eps_fn: ``(x, t[b], ctx) -> eps``.
      schedule: the training noise schedule.
      noise: x_T.
      ctx, ctx_uncond: conditional and unconditional conditioning (ctx_uncond None: no guidance).
      num_steps: S sampling steps (trailing timesteps).
      guidance: CFG scale w.
      clip_x0: clip the predicted x_0 to [-clip, clip] (images live in [-1, 1]); None: no clipping.
    """
    ts = ddim_timesteps(schedule.num_steps, num_steps)
    step = _step_fn(eps_fn, schedule, ts, ctx, ctx_uncond, guidance, clip_x0)
    x, _ = jax.lax.scan(lambda x, i: (step(x, i), None), noise, jnp.arange(num_steps))
    return x


def ddim_rollout(eps_fn, schedule: Schedule, noise: jax.Array, ctx, ctx_uncond, n: jax.Array, *,
                 num_steps: int = 20, guidance: float = 3.0, clip_x0: float | None = 1.0):
    """The first ``n`` (traced int, 0 <= n < num_steps) of ``num_steps`` DDIM steps from ``noise``.

    Returns (x, t): the partially denoised x and its timestep ``ddim_timesteps(T, S)[n]`` (scalar int32).
    A ``fori_loop`` with a traced trip count: not reverse-differentiable, so ``eps_fn`` must not carry
    gradients (SPM's x_t comes from a stop-gradient copy of the model).
    """
    ts = ddim_timesteps(schedule.num_steps, num_steps)
    step = _step_fn(eps_fn, schedule, ts, ctx, ctx_uncond, guidance, clip_x0)
    x = jax.lax.fori_loop(0, n, lambda i, x: step(x, i), noise)
    return x, jnp.asarray(ts, jnp.int32)[n]
