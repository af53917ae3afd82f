"""Noise schedules and the eps-prediction loss.

A ``Schedule`` holds ``alphas_cumprod`` (alpha_bar_t, t = 0 .. T-1) of a discrete T-step forward process
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``. ``cosine_schedule`` is Nichol & Dhariwal's
(alpha_bar(t) = cos^2((t/T + s) / (1 + s) pi/2), betas clipped at 0.999); ``linear_schedule`` is DDPM's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
    """alpha_bar over ``num_steps`` discrete timesteps (float32 [T] numpy, a constant inside jit)."""
    alphas_cumprod: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: jax.Array) -> jax.Array:
        """alpha_bar at integer timesteps t (any shape); t = -1 means the clean image (alpha_bar = 1)."""
        ab = jnp.asarray(self.alphas_cumprod)
        t = jnp.asarray(t, jnp.int32)
        return jnp.where(t < 0, 1.0, ab[jnp.clip(t, 0, self.num_steps - 1)])


def _from_betas(betas: np.ndarray) -> Schedule:
    return Schedule(np.cumprod(1.0 - betas).astype(np.float32))


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    f = lambda t: np.cos((t / num_steps + s) / (1 + s) * np.pi / 2) ** 2   # noqa: E731
    t = np.arange(num_steps + 1, dtype=np.float64)
    betas = np.minimum(1 - f(t[1:]) / f(t[:-1]), max_beta)
    return _from_betas(betas)


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    return _from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))


def make_schedule(name: str, num_steps: int = 1000) -> Schedule:
    if name == "cosine":
        return cosine_schedule(num_steps)
    if name == "linear":
        return linear_schedule(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; known: 'cosine', 'linear'")


def add_noise(schedule: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; x0/eps [b, ...], t [b]."""
    ab = schedule.alpha_bar(t).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps


def min_snr_weight(schedule: Schedule, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma weight of the eps loss (Hang et al. 2023): min(SNR_t, gamma) / SNR_t, SNR = ab / (1 - ab).

    1 wherever SNR <= gamma (the noisy steps, where the global layout is decided), gamma / SNR below that, so
    the nearly clean steps, whose eps error is the largest and says least about the image's content, stop
    dominating the mean loss."""
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    ab = schedule.alpha_bar(t)
    snr = ab / jnp.maximum(1.0 - ab, 1e-12)
    return jnp.minimum(snr, gamma) / snr


def eps_loss(eps_fn, schedule: Schedule, x0: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-example eps-prediction MSE [b] and the timesteps drawn [b].

    t ~ U{0..T-1}, eps ~ N(0, I); ``eps_fn(x_t, t) -> eps_hat``. (Weight it with ``min_snr_weight(t)`` for
    min-SNR training.)
    """
    k_t, k_e = jax.random.split(rng)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, schedule.num_steps)
    eps = jax.random.normal(k_e, x0.shape, jnp.float32)
    pred = eps_fn(add_noise(schedule, x0, t, eps), t)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps), axis=tuple(range(1, x0.ndim))), t
