"""Mamba (S6, Gu & Dao 2023) and Mamba-2 (SSD, Dao & Gu 2024) mixers.

See /work/shared/papers/mamba_free_lunch.md §3.1 (S6 block and initialisation) and §3.2 (SSD block).

``Mamba`` (letter "M", sub-config ``mamba``), per token with D_in = expand * d_model::

    x, z = h W_x, h W_z                                  (in-projection, no bias)
    u = silu(causal_depthwise_conv(x))                   (width d_conv, with bias)
    dt_low, B, C = u W_sel                               (dt_rank, N, N)
    delta = softplus(dt_low W_dt + b_dt)                 ([D_in], float32)
    s_t = exp(delta A) s_{t-1} + delta B_t u_t,  y = s_t C_t + D u_t     (A = -exp(A_log): [D_in, N])
    out = (y * silu(z)) W_out

``Mamba2`` (letter "2", sub-config ``mamba2``), with H = D_in / head_dim heads and G B/C groups::

    z, x, B, C, dt = h W_z, h W_x, h W_B, h W_C, h W_dt  (in-projection, no bias)
    x, B, C = silu(causal_depthwise_conv([x, B, C]))     (B and C are convolved too)
    dt = softplus(dt + dt_bias)                          ([H], float32; one step size per head)
    S_t = exp(dt A) S_{t-1} + (dt x_t) B_t^T,  y = S_t C_t + D x_t       (A = -exp(A_log): [H])
    out = RMSNorm(y * silu(z)) W_out                     (gate before the norm, over all of D_in)

The scans are ``kernels.mamba`` ops (``impl``: auto | ref | chunked | interpret | pallas). Segment ids
(packed sequences) reset both the conv window and the scan state at every segment start. Decoding keeps a
constant-size cache: the conv window (last d_conv - 1 pre-conv inputs) and the float32 SSM state.

The in-projection W_in of the reference code is stored as separate matrices (x, z, ...); it is the same
linear map, but each piece gets its own logical axes, so the head-sharded parts are never concatenated with
replicated ones. Likewise the one depthwise conv over ``[x, B, C]`` is two convs (depthwise = per channel).

Shapes: b batch, t time, d d_model, e D_in, n d_state, r dt_rank, h heads, p head_dim, g ngroups.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.mamba import selective_scan, selective_scan_step, ssd, ssd_step
from sqattn import mixers
from sqattn.layers import Dense, RMSNorm, ShortConv, param

_F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Parameterisation helpers (initialisers of §3.1 / §3.2).
# ----------------------------------------------------------------------------------------------


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """``"auto"`` -> ceil(d_model / 16) (the Mamba default); ints (or digit strings) pass through."""
    if isinstance(dt_rank, str):
        if dt_rank == "auto":
            return math.ceil(d_model / 16)
        if not dt_rank.isdigit():
            raise ValueError(f"mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        dt_rank = int(dt_rank)
    if dt_rank < 1:
        raise ValueError(f"mamba: dt_rank must be >= 1, got {dt_rank}")
    return int(dt_rank)


def uniform_init(bound: float):
    """Initialiser drawing U(-bound, bound) (W_dt of §3.1: bound = dt_rank^-1/2)."""
    def init(key, shape, dtype=_F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def inverse_softplus(y: jax.Array) -> jax.Array:
    """x with softplus(x) = y, for y > 0: ``y + log(-expm1(-y))`` (stable for small y)."""
    return y + jnp.log(-jnp.expm1(-y))


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
    """Initialiser of the dt bias: dt ~ log-uniform [dt_min, dt_max], clamped >= dt_floor, then
    inverse softplus, so ``softplus(bias)`` starts in [dt_min, dt_max]."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")

    def init(key, shape, dtype=_F32):
        u = jax.random.uniform(key, shape, _F32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        return inverse_softplus(jnp.maximum(dt, dt_floor)).astype(dtype)
    return init


def s4d_real_a_log(d_inner: int, d_state: int) -> jax.Array:
    """S4D-real A_log [d_inner, d_state] = log(n) for n = 1..d_state in every channel."""
    return jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=_F32), (d_inner, d_state)))


def head_a_log_init(lo: float = 1.0, hi: float = 16.0):
    """Initialiser of the Mamba-2 A_log [h]: log of A ~ U(lo, hi), one scalar per head."""
    if not 0 < lo <= hi:
        raise ValueError(f"mamba2: need 0 < A_init_range[0] <= A_init_range[1], got ({lo}, {hi})")

    def init(key, shape, dtype=_F32):
        return jnp.log(jax.random.uniform(key, shape, _F32, lo, hi)).astype(dtype)
    return init


# ----------------------------------------------------------------------------------------------
# Mamba-1 (S6).
# ----------------------------------------------------------------------------------------------


@mixers.register("M", "mamba", "Mamba (S6 selective scan; kernels.mamba.selective_scan)")
class Mamba(nnx.Module):
    """The Mamba-1 block of §3.1 (``mamba_simple.py``), without its residual and norm (the LM adds them).

    Attributes:
      d_inner: D_in = expand * d_model.  d_state: N.  dt_rank: R (``"auto"`` = ceil(d_model / 16)).
      d_conv: depthwise causal conv width.  chunk_size, impl: passed to ``selective_scan``.
      A_log: [D_in, N] float32, S4D-real init.  D: [D_in] skip, init 1.
      dt_proj: W_dt [R, D_in] ~ U(+-R^-1/2) with bias = inverse softplus of a log-uniform dt; runs in
        float32 so delta (and everything in the scan) is float32.
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, dt_rank: int | str = "auto", dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, chunk_size: int = 64,
                 impl: str = "auto", out_scale: float = 1.0):
        if d_state < 1 or expand < 1 or d_conv < 1:
            raise ValueError(f"mamba: d_state, expand and d_conv must be >= 1, got {d_state}, {expand}, "
                             f"{d_conv}")
        e, n, r = expand * d_model, d_state, resolve_dt_rank(dt_rank, d_model)
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = e, n, r, d_conv
        self.chunk_size, self.impl, self.dtype = chunk_size, impl, dtype
        self.in_x = Dense(d_model, e, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.in_z = Dense(d_model, e, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.conv = ShortConv(e, d_conv, rngs=rngs, use_bias=True, dtype=dtype)
        self.x_proj = Dense(e, r + 2 * n, axes=("heads", None), rngs=rngs, dtype=dtype)   # W_x
        self.dt_proj = Dense(r, e, axes=("lowrank", "heads"), rngs=rngs, dtype=_F32, use_bias=True)
        self.dt_proj.kernel = param(rngs, uniform_init(r ** -0.5), (r, e), ("lowrank", "heads"))
        self.dt_proj.bias = param(rngs, dt_bias_init(dt_min, dt_max, dt_init_floor), (e,), ("heads",))
        self.A_log = nnx.Param(s4d_real_a_log(e, n), axes=("heads", "state"))
        self.D = nnx.Param(jnp.ones((e,), _F32), axes=("heads",))
        self.out_proj = Dense(e, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                              init_scale=out_scale)

    # ---- pieces shared by the parallel and the step form (leading dims [...] = [b, t] or [b])
    def _selection(self, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """u [..., e] -> (delta [..., e] f32, B [..., n], C [..., n])."""
        r, n = self.dt_rank, self.d_state
        sel = self.x_proj(u)                                                     # [..., r + 2n]
        dt_low, b, c = sel[..., :r], sel[..., r:r + n], sel[..., r + n:]
        delta = jax.nn.softplus(self.dt_proj(dt_low.astype(_F32)))               # [..., e] f32
        return delta, b, c

    def _a(self) -> jax.Array:
        return -jnp.exp(self.A_log[...])                                         # [e, n] f32

    def _output(self, y: jax.Array, z: jax.Array) -> jax.Array:
        return self.out_proj(y * jax.nn.silu(z))                                 # [..., d]

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        xi, z = self.in_x(x), self.in_z(x)                                       # [b, t, e] each
        u = jax.nn.silu(self.conv(xi, segment_ids))                              # [b, t, e]
        delta, b, c = self._selection(u)
        y, _ = selective_scan(u, delta, self._a(), b, c, self.D[...], segment_ids=segment_ids,
                              chunk_size=self.chunk_size, impl=self.impl)        # [b, t, e]
        return self._output(y, z)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """{"conv": [b, d_conv - 1, e] window of pre-conv inputs, "ssm": [b, e, n] float32}."""
        del max_len  # constant-size state
        return {"conv": self.conv.init_cache(batch, dtype),
                "ssm": jnp.zeros((batch, self.d_inner, self.d_state), _F32)}

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        xi, z = self.in_x(x_t), self.in_z(x_t)                                   # [b, e] each
        xc, window = self.conv.step(xi, cache["conv"])
        u = jax.nn.silu(xc)                                                      # [b, e]
        delta, b, c = self._selection(u)
        y, ssm = selective_scan_step(u, delta, self._a(), b, c, self.D[...], cache["ssm"])
        return self._output(y, z), {"conv": window, "ssm": ssm}

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Parameter-free FLOPs per token: the scan (~7 per channel and state: discretise, decay,
        input, add, readout) and the depthwise conv."""
        del seq_len
        return 7.0 * self.d_inner * self.d_state + 2.0 * self.d_conv * self.d_inner


# ----------------------------------------------------------------------------------------------
# Mamba-2 (SSD).
# ----------------------------------------------------------------------------------------------


@mixers.register("2", "mamba2", "Mamba-2 (SSD, scalar decay per head; kernels.mamba.ssd)")
class Mamba2(nnx.Module):
    """The Mamba-2 block of §3.2 (``mamba2_simple.py``), without its residual and norm.

    Attributes:
      d_inner: D_in = expand * d_model.  num_heads: H = D_in / head_dim.  head_dim: P.  d_state: N.
      ngroups: G B/C groups (G divides H; head i reads group i // (H / G)).
      A_log: [H] = log U(A_init_range).  D: [H], init 1.  dt_bias: [H], inverse softplus of a
        log-uniform dt in [dt_min, dt_max].  norm: gated RMSNorm over D_in (eps norm_eps).
      chunk_size, impl: passed to ``ssd``.
    """

    def __init__(self, d_model: int, *, rngs: nnx.Rngs, dtype=jnp.float32, d_state: int = 64,
                 expand: int = 2, head_dim: int = 64, ngroups: int = 1, d_conv: int = 4,
                 A_init_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, norm_eps: float = 1e-5,
                 chunk_size: int = 64, impl: str = "auto", out_scale: float = 1.0):
        e = expand * d_model
        if d_state < 1 or expand < 1 or d_conv < 1 or head_dim < 1:
            raise ValueError(f"mamba2: d_state, expand, d_conv and head_dim must be >= 1, got "
                             f"{d_state}, {expand}, {d_conv}, {head_dim}")
        if e % head_dim:
            raise ValueError(f"mamba2: head_dim={head_dim} does not divide D_in = expand * d_model = {e}")
        h = e // head_dim
        if ngroups < 1 or h % ngroups:
            raise ValueError(f"mamba2: ngroups={ngroups} does not divide the {h} heads")
        g, n = ngroups, d_state
        self.d_inner, self.num_heads, self.head_dim, self.d_state, self.ngroups = e, h, head_dim, n, g
        self.d_conv, self.chunk_size, self.impl, self.dtype = d_conv, chunk_size, impl, dtype
        self.in_z = Dense(d_model, e, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.in_x = Dense(d_model, e, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.in_bc = Dense(d_model, 2 * g * n, axes=("embed", "state"), rngs=rngs, dtype=dtype)
        self.in_dt = Dense(d_model, h, axes=("embed", "heads"), rngs=rngs, dtype=dtype)
        self.conv_x = ShortConv(e, d_conv, rngs=rngs, use_bias=True, dtype=dtype)
        self.conv_bc = ShortConv(2 * g * n, d_conv, rngs=rngs, use_bias=True, dtype=dtype)
        self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max, dt_init_floor), (h,), ("heads",))
        self.A_log = param(rngs, head_a_log_init(*A_init_range), (h,), ("heads",))
        self.D = nnx.Param(jnp.ones((h,), _F32), axes=("heads",))
        self.norm = RMSNorm(e, eps=norm_eps)
        self.out_proj = Dense(e, d_model, axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                              init_scale=out_scale)

    # ---- pieces shared by the parallel and the step form (leading dims [...] = [b, t] or [b])
    def _ssm_inputs(self, xc: jax.Array, bc: jax.Array, dt: jax.Array):
        """Post-conv x [..., e], bc [..., 2gn] and raw dt [..., h] -> (x [..., h, p], dt [..., h] f32,
        B [..., g, n], C [..., g, n])."""
        lead = xc.shape[:-1]
        g, n = self.ngroups, self.d_state
        x = jax.nn.silu(xc).reshape(*lead, self.num_heads, self.head_dim)        # [..., h, p]
        bc = jax.nn.silu(bc)
        b = bc[..., :g * n].reshape(*lead, g, n)                                 # [..., g, n]
        c = bc[..., g * n:].reshape(*lead, g, n)                                 # [..., g, n]
        dt = jax.nn.softplus(dt.astype(_F32) + self.dt_bias[...])                # [..., h] f32
        return x, dt, b, c

    def _a(self) -> jax.Array:
        return -jnp.exp(self.A_log[...])                                         # [h] f32

    def _output(self, y: jax.Array, z: jax.Array) -> jax.Array:
        y = y.reshape(*y.shape[:-2], self.d_inner)                               # [..., e]
        return self.out_proj(self.norm(y * jax.nn.silu(z)))                      # [..., d]

    def __call__(self, x: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        z = self.in_z(x)                                                         # [b, t, e]
        xc = self.conv_x(self.in_x(x), segment_ids)                              # [b, t, e]
        bc = self.conv_bc(self.in_bc(x), segment_ids)                            # [b, t, 2gn]
        xs, dt, b, c = self._ssm_inputs(xc, bc, self.in_dt(x))
        y, _ = ssd(xs, dt, self._a(), b, c, self.D[...], segment_ids=segment_ids,
                   chunk_size=self.chunk_size, impl=self.impl)                   # [b, t, h, p]
        return self._output(y, z)

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> dict:
        """{"conv_x": [b, d_conv-1, e], "conv_bc": [b, d_conv-1, 2gn], "ssm": [b, h, p, n] float32}."""
        del max_len  # constant-size state
        return {"conv_x": self.conv_x.init_cache(batch, dtype),
                "conv_bc": self.conv_bc.init_cache(batch, dtype),
                "ssm": jnp.zeros((batch, self.num_heads, self.head_dim, self.d_state), _F32)}

    def step(self, x_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        z = self.in_z(x_t)                                                       # [b, e]
        xc, win_x = self.conv_x.step(self.in_x(x_t), cache["conv_x"])            # [b, e]
        bc, win_bc = self.conv_bc.step(self.in_bc(x_t), cache["conv_bc"])        # [b, 2gn]
        xs, dt, b, c = self._ssm_inputs(xc, bc, self.in_dt(x_t))
        y, ssm = ssd_step(xs, dt, self._a(), b, c, self.D[...], cache["ssm"])   # y: [b, h, p]
        return self._output(y, z), {"conv_x": win_x, "conv_bc": win_bc, "ssm": ssm}

    def extra_flops_per_token(self, seq_len: int) -> float:
        """Parameter-free FLOPs per token of the chunked SSD: chunk states and their readout
        (4 h p n), the intra-chunk quadratic form ((g n + h p) * min(chunk, T)) and the conv."""
        q = min(self.chunk_size, seq_len)
        e, h, p, n, g = self.d_inner, self.num_heads, self.head_dim, self.d_state, self.ngroups
        return 4.0 * h * p * n + (g * n + h * p) * q + 2.0 * self.d_conv * (e + 2 * g * n)
