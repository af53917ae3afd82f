"""GRT: gated residual tokenization for dense video (``../shared/papers/grt.md``; arXiv 2509.14199), at toy scale.

Stage 1 (inter-gated tokenization): frames are cut into p x p patches; a frame is a K-frame (every patch tokenized)
at the first frame, at a detected scene cut and every ``k_every`` sampled frames; in a P-frame a patch is tokenized
only when its SSIM against the reference falls below ``tau`` (optionally also requiring a mean absolute difference
above ``min_abs_diff``, the note's guard for flat patches). Stage 2 (intra-tokenization merging): each scene's first
K-frame is summarised as a distribution (a colour histogram, or the softmax of its mean encoder token) and scenes
whose Jensen-Shannon divergence to an earlier kept scene is below ``delta`` are merged: their key tokens are fused
with that scene's (mean or first) and passed on once. Residual tokens keep their frame index and patch position.

The encoder is a small ViT over the variable-length set of gated tokens of each frame (bidirectional attention
with a key-padding mask, learned patch-position table, optional sinusoidal time embedding), run through
``BucketedEncoder``: each frame's set is padded to the smallest bucket length, frames are batched ``batch_rows`` at a
time, so at most ``len(buckets)`` shapes compile; every new shape is logged and kept in ``compiled_shapes``.

Unconfirmed details of the paper are flags here (toy defaults): ``reference`` ("previous" sampled frame, the note's
default; "kframe"; or "decoded": the last tokenized version of each patch, which cannot drift), the K-frame rule
(``k_every``, ``scene_cut``), ``tau``, ``delta``, the JSD distribution (``merge_dist``) and the fusion (``fuse``).

Shapes: T sampled frames, H = W frame side, C = 3 channels, p patch side, N = (H/p)^2 patches, P = p*p*C, d width.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.layers import Dense, RMSNorm, SwiGLU, param
from sqattn.mixers.attention import dot_product_attention, init_qkvo

REFERENCES = ("previous", "kframe", "decoded")
MERGE_DISTS = ("hist", "token")
FUSES = ("mean", "first")


# -- patches and SSIM ------------------------------------------------------------------------------------------------

def _check_patch(h: int, w: int, p: int) -> None:
    if p <= 0 or h % p or w % p:
        raise ValueError(f"frame {h}x{w} is not divisible into {p}x{p} patches")


def patchify(frames: jax.Array, p: int) -> jax.Array:
    """[..., H, W, C] -> [..., N, p*p*C], patches in row-major order (patch j = row j // (W/p), col j % (W/p))."""
    *lead, h, w, c = frames.shape
    _check_patch(h, w, p)
    x = frames.reshape(*lead, h // p, p, w // p, p, c)                     # [..., hp, p, wp, p, C]
    x = jnp.moveaxis(x, -3, -4)                                            # [..., hp, wp, p, p, C]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, p: int, h: int, w: int) -> jax.Array:
    """Inverse of ``patchify``: [..., N, p*p*C] -> [..., H, W, C]."""
    *lead, n, pc = patches.shape
    _check_patch(h, w, p)
    c = pc // (p * p)
    x = patches.reshape(*lead, h // p, w // p, p, p, c)                    # [..., hp, wp, p, p, C]
    x = jnp.moveaxis(x, -4, -3)                                            # [..., hp, p, wp, p, C]
    return x.reshape(*lead, h, w, c)


def _patch_mean(x: jax.Array, p: int) -> jax.Array:
    """Per-patch mean per channel without a transpose: [..., H, W, C] -> [..., N, C]."""
    *lead, h, w, c = x.shape
    _check_patch(h, w, p)
    m = x.reshape(*lead, h // p, p, w // p, p, c).mean((-4, -2))            # [..., hp, wp, C]
    return m.reshape(*lead, (h // p) * (w // p), c)


def patch_ssim(a: jax.Array, b: jax.Array, p: int, *, data_range: float = 1.0, k1: float = 0.01,
               k2: float = 0.03) -> jax.Array:
    """Per-patch SSIM with one global window per p x p patch, per channel, averaged over channels.

    ``SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))`` with population
    (1/n) moments, C1 = (k1 L)^2, C2 = (k2 L)^2. a, b: [..., H, W, C] floats -> [..., N] float32.
    """
    if a.shape != b.shape:
        raise ValueError(f"patch_ssim: shapes differ {a.shape} vs {b.shape}")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    mu_a, mu_b = _patch_mean(a, p), _patch_mean(b, p)                                 # [..., N, C]
    var_a = _patch_mean(a * a, p) - mu_a ** 2                                         # E[x^2] - E[x]^2
    var_b = _patch_mean(b * b, p) - mu_b ** 2
    cov = _patch_mean(a * b, p) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean(-1)                                                                # [..., N]


def patch_abs_diff(a: jax.Array, b: jax.Array, p: int) -> jax.Array:
    """Mean |a - b| per patch: [..., H, W, C] -> [..., N]."""
    return _patch_mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), p).mean(-1)


# -- Jensen-Shannon divergence ---------------------------------------------------------------------------------------

def jensen_shannon(p, q, axis: int = -1) -> np.ndarray:
    """JSD(p, q) in nats along ``axis`` (inputs are normalised to sum 1 first); in [0, log 2]. Host-side numpy
    (float64): it runs once per scene pair."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if (p < 0).any() or (q < 0).any():
        raise ValueError("jensen_shannon: distributions must be non-negative")
    p = p / p.sum(axis, keepdims=True)
    q = q / q.sum(axis, keepdims=True)
    m = 0.5 * (p + q)

    def kl(x):  # KL(x || m), with 0 log 0 = 0 (x > 0 implies m > 0)
        safe = x > 0
        return np.sum(np.where(safe, x * (np.log(np.where(safe, x, 1.0)) - np.log(np.where(safe, m, 1.0))), 0.0),
                      axis)

    return np.clip(0.5 * kl(p) + 0.5 * kl(q), 0.0, math.log(2.0))


def colour_histogram(frame: np.ndarray, bins: int = 16) -> np.ndarray:
    """A uint8 [H, W, 3] frame -> [3 * bins] histogram (per channel, concatenated), summing to 1."""
    h = np.concatenate([np.bincount((frame[..., ch].astype(np.int64).ravel() * bins) // 256, minlength=bins)
                        for ch in range(frame.shape[-1])]).astype(np.float64)
    return h / h.sum()


# -- the gate --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GRTConfig:
    """GRT-toy settings (defaults: the note's toy, p = 8, tau = 0.95, K every 64 sampled frames)."""
    patch: int = 8
    tau: float = 0.95                 # gate: SSIM < tau
    min_abs_diff: float = 0.0         # and mean |diff| > this (in [0, 1] intensity units); 0 = off
    reference: str = "previous"       # "previous" | "kframe" | "decoded"
    k_every: int = 64                 # periodic K-frame refresh, in sampled frames
    scene_cut: float = 0.5            # a frame whose fraction of gated patches vs the previous frame is >= this
    merge: bool = False               # stage 2: merge scenes by JSD
    merge_delta: float = 0.1          # merge when JSD < delta (nats)
    merge_dist: str = "hist"          # "hist": 16-bin colour histogram; "token": softmax of the mean key token
    hist_bins: int = 16
    fuse: str = "mean"                # merged key content: "mean" of the scenes' keys, or the "first" scene's

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"GRTConfig.reference={self.reference!r}; expected one of {REFERENCES}")
        if self.merge_dist not in MERGE_DISTS:
            raise ValueError(f"GRTConfig.merge_dist={self.merge_dist!r}; expected one of {MERGE_DISTS}")
        if self.fuse not in FUSES:
            raise ValueError(f"GRTConfig.fuse={self.fuse!r}; expected one of {FUSES}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"GRTConfig.tau must be in (0, 1], got {self.tau}")
        if self.k_every < 1:
            raise ValueError(f"GRTConfig.k_every must be >= 1, got {self.k_every}")


@dataclasses.dataclass
class TokenPlan:
    """Which patches a method tokenizes.

    Attributes:
      gate: [T, N] bool, patches the ViT encodes.  is_key: [T] bool, K-frames.  scene_start: [T] bool.
      emitted: [T, N] bool, tokens passed on (``gate`` minus the key tokens of merged scenes).
      key_group: [T] int, for K-frames of merged scenes the frame index of the scene they merged into (the
        group's representative, included), else -1.  jsd: [S, S] JSD between scene-start K-frames (or None).
      fuse: how a merged group's key content is fused ("mean" | "first").
    """
    gate: np.ndarray
    is_key: np.ndarray
    scene_start: np.ndarray
    emitted: np.ndarray
    key_group: np.ndarray
    jsd: np.ndarray | None = None
    fuse: str = "mean"

    @property
    def tokens(self) -> int:
        return int(self.emitted.sum())

    @property
    def encoded(self) -> int:
        return int(self.gate.sum())


def _to_float(frames) -> jax.Array:
    frames = jnp.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    return frames.astype(jnp.float32) / 255.0 if frames.dtype == jnp.uint8 else frames.astype(jnp.float32)


def _gate(a, b, p: int, tau, min_abs_diff):
    """[..., H, W, C] pair -> [..., N] bool: SSIM < tau and (min_abs_diff <= 0 or mean |a - b| > min_abs_diff)."""
    g = patch_ssim(a, b, p) < tau
    return g & ((min_abs_diff <= 0) | (patch_abs_diff(a, b, p) > min_abs_diff))


@functools.partial(jax.jit, static_argnums=(2,))
def _gate_jit(a, b, p, tau, min_abs_diff):
    return _gate(a, b, p, tau, min_abs_diff)


def gate_pairs(a: jax.Array, b: jax.Array, cfg: GRTConfig) -> jax.Array:
    """Gate of frames ``a`` against references ``b`` ([T, H, W, C] each) -> [T, N] bool (vectorised)."""
    return _gate_jit(a, b, cfg.patch, cfg.tau, cfg.min_abs_diff)


@functools.partial(jax.jit, static_argnums=(2,))
def _gate_decoded(x, is_key, p, tau, min_abs_diff):
    """Gate against the decoder canvas (the last tokenized version of each patch), scanned over frames."""
    h, w = x.shape[1:3]

    def step(canvas, inp):                                             # canvas [N, P]
        frame, key = inp
        g = _gate(frame, unpatchify(canvas, p, h, w), p, tau, min_abs_diff) | key   # [N]
        canvas = jnp.where(g[:, None], patchify(frame, p), canvas)
        return canvas, g

    _, gates = jax.lax.scan(step, patchify(x[0], p), (x, is_key))
    return gates


def key_frames(cut: np.ndarray, k_every: int) -> tuple[np.ndarray, np.ndarray]:
    """K-frame rule: frame 0, every detected cut (``cut[t]`` True) and ``k_every`` frames after the last K-frame.
    Returns (is_key [T], scene_start [T])."""
    t_total = len(cut)
    is_key = np.zeros(t_total, bool)
    scene_start = np.zeros(t_total, bool)
    last = 0
    for t in range(t_total):
        if t == 0 or cut[t]:
            scene_start[t] = is_key[t] = True
        elif t - last >= k_every:
            is_key[t] = True
        if is_key[t]:
            last = t
    return is_key, scene_start


def grt_plan(frames, cfg: GRTConfig = GRTConfig(), key_features: np.ndarray | None = None) -> TokenPlan:
    """Stage 1 (and stage 2 when ``cfg.merge``) on sampled frames uint8/float [T, H, W, 3].

    ``key_features``: for ``merge_dist="token"``, a [T, d] array whose rows at scene starts are the mean encoder
    tokens of those K-frames (see ``key_token_means``).
    """
    x = _to_float(frames)
    t_total = x.shape[0]
    _check_patch(x.shape[1], x.shape[2], cfg.patch)
    n = (x.shape[1] // cfg.patch) * (x.shape[2] // cfg.patch)
    prev_gate = np.zeros((t_total, n), bool)
    if t_total > 1:
        prev_gate[1:] = np.asarray(gate_pairs(x[1:], x[:-1], cfg))
    cut = prev_gate.mean(1) >= cfg.scene_cut
    is_key, scene_start = key_frames(cut, cfg.k_every)
    if cfg.reference == "previous":
        gate = prev_gate
    elif cfg.reference == "kframe":
        ref = np.maximum.accumulate(np.where(is_key, np.arange(t_total), 0))
        gate = np.asarray(gate_pairs(x, x[ref], cfg))
    else:
        gate = np.asarray(_gate_decoded(x, jnp.asarray(is_key), cfg.patch, cfg.tau, cfg.min_abs_diff))
    gate = gate | is_key[:, None]
    plan = TokenPlan(gate, is_key, scene_start, gate.copy(), np.full(t_total, -1), None, cfg.fuse)
    if cfg.merge:
        plan = merge_scenes(np.asarray(frames), plan, cfg, key_features)
    return plan


def merge_scenes(frames: np.ndarray, plan: TokenPlan, cfg: GRTConfig,
                 key_features: np.ndarray | None = None) -> TokenPlan:
    """Stage 2: greedy JSD merging of scenes by their first K-frame; returns a new plan.

    Each scene (in time order) is compared with the representatives kept so far; if the smallest JSD is below
    ``cfg.merge_delta`` it joins that representative's group (its key tokens are not passed on separately),
    otherwise it becomes a representative.
    """
    starts = np.flatnonzero(plan.scene_start)
    if cfg.merge_dist == "hist":
        if frames.dtype != np.uint8:
            frames = np.clip(np.round(np.asarray(frames) * 255.0), 0, 255).astype(np.uint8)
        dists = np.stack([colour_histogram(frames[t], cfg.hist_bins) for t in starts])
    else:
        if key_features is None:
            raise ValueError("merge_scenes: merge_dist='token' needs key_features (mean key tokens per frame)")
        dists = np.asarray(jax.nn.softmax(jnp.asarray(key_features[starts], jnp.float32), axis=-1))
    jsd = np.asarray(jensen_shannon(dists[:, None, :], dists[None, :, :]))         # [S, S]
    key_group = np.full(len(plan.is_key), -1)
    emitted = plan.emitted.copy()
    reps: list[int] = []
    for i, t in enumerate(starts):
        if reps:
            j = min(reps, key=lambda r: jsd[i, r])
            if jsd[i, j] < cfg.merge_delta:
                key_group[t] = key_group[starts[j]] = starts[j]
                emitted[t] = False
                continue
        reps.append(i)
    return dataclasses.replace(plan, emitted=emitted, key_group=key_group, jsd=jsd, fuse=cfg.fuse)


def dense_plan(num_frames: int, num_patches: int) -> TokenPlan:
    """Every patch of every sampled frame (each frame is its own key)."""
    every = np.ones((num_frames, num_patches), bool)
    keys = np.ones(num_frames, bool)
    return TokenPlan(every, keys, keys.copy(), every.copy(), np.full(num_frames, -1))


def uniform_plan(num_frames: int, num_patches: int, budget: int = 8) -> TokenPlan:
    """A fixed budget of ``budget`` evenly spaced frames (all patches); fewer frames than the budget: all."""
    k = min(budget, num_frames)
    chosen = np.zeros(num_frames, bool)
    chosen[np.floor(np.arange(k) * num_frames / k).astype(int)] = True          # frames 0, T/k, 2T/k, ...
    gate = np.repeat(chosen[:, None], num_patches, 1)
    return TokenPlan(gate, chosen, chosen.copy(), gate.copy(), np.full(num_frames, -1))


# -- codec-style reconstruction and dense-evidence recall ------------------------------------------------------------

def key_content(patches: np.ndarray, plan: TokenPlan) -> np.ndarray:
    """Per-frame patch content after stage 2: merged K-frames get their group's fused key content. [T, N, P]."""
    out = np.array(patches, np.float32, copy=True)
    for rep in np.unique(plan.key_group[plan.key_group >= 0]):
        members = np.flatnonzero(plan.key_group == rep)
        fused = out[members].mean(0) if plan.fuse == "mean" else out[rep].copy()
        out[members] = fused
    return out


def reconstruct(frames: np.ndarray, plan: TokenPlan, p: int) -> np.ndarray:
    """Decoder canvas after each sampled frame ([T, H, W, 3] float in [0, 1]): every patch holds the last encoded
    version of it (copied from the pixels; merged keys replaced by their fused content)."""
    x = np.asarray(_to_float(frames))
    h, w = x.shape[1:3]
    content = key_content(np.asarray(patchify(x, p)), plan)                          # [T, N, P]
    written = plan.gate                                # merged K-frames write their fused key content
    canvas = np.zeros_like(content[0])
    first = np.flatnonzero(written.any(1))
    out = np.zeros_like(content)
    if len(first):
        canvas = content[first[0]].copy()
    for t in range(len(content)):
        canvas = np.where(written[t][:, None], content[t], canvas)
        out[t] = canvas
    return np.asarray(unpatchify(out, p, h, w))


def psnr(recon: np.ndarray, truth: np.ndarray) -> float:
    """PSNR (dB, peak 1) of the mean squared error over all frames and pixels."""
    mse = float(np.mean((np.asarray(recon, np.float64) - np.asarray(truth, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def native_psnr(canvases: np.ndarray, sample_native_index: np.ndarray, native_frames: np.ndarray) -> float:
    """PSNR over every native frame, each shown as the canvas of the last sampled frame at or before it."""
    hold = np.searchsorted(sample_native_index, np.arange(len(native_frames)), side="right") - 1
    if hold[0] < 0:
        raise ValueError("native_psnr: the first native frame precedes every sampled frame")
    return psnr(canvases[hold], np.asarray(_to_float(native_frames)))   # the canvases' own uint8 -> float path


def patches_touching(box: tuple[int, int, int, int], p: int, width: int) -> np.ndarray:
    """Indices of the p x p patches overlapping the pixel box (y0, y1, x0, x1) of a frame ``width`` wide."""
    y0, y1, x0, x1 = box
    rows = range(y0 // p, (y1 - 1) // p + 1)
    cols = range(x0 // p, (x1 - 1) // p + 1)
    return np.array([r * (width // p) + c for r in rows for c in cols], np.int64)


def change_recall(plan: TokenPlan, sample_times: np.ndarray, change_times: np.ndarray,
                  patches: np.ndarray) -> float:
    """Fraction of changes (at ``change_times``) whose ``patches`` were passed on (``plan.emitted``) by a frame in
    [change, next change); the last change's interval is open-ended."""
    hit = plan.emitted[:, patches].any(1)                                            # [T]
    bounds = np.append(change_times, np.inf)
    got = [bool(np.any(hit & (sample_times >= bounds[k]) & (sample_times < bounds[k + 1])))
           for k in range(len(change_times))]
    return float(np.mean(got)) if got else float("nan")


# -- the encoder -----------------------------------------------------------------------------------------------------

def time_embedding(times: jax.Array, d: int, max_period: float = 100.0) -> jax.Array:
    """Sinusoidal embedding of times in seconds: [...] -> [..., d]."""
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(d // 2, dtype=jnp.float32) / (d // 2)) * 2 * math.pi
    ang = jnp.asarray(times, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], -1)
    return jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, d - emb.shape[-1])])


class _EncoderBlock(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs, out_scale: float):
        self.h, self.hd = num_heads, d_model // num_heads
        self.norm1 = RMSNorm(d_model)
        init_qkvo(self, d_model, num_heads, num_heads, self.hd, rngs=rngs, dtype=jnp.float32, out_scale=out_scale)
        self.norm2 = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, mlp_dim, rngs=rngs, out_scale=out_scale)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        y = self.norm1(x)
        q = self.q(y).reshape(b, t, self.h, self.hd)                                  # [b,t,h,k]
        k = self.k(y).reshape(b, t, self.h, self.hd)
        v = self.v(y).reshape(b, t, self.h, self.hd)
        attend = mask[:, None, :] & mask[:, :, None]                                  # [b,t,s] bidirectional
        x = x + self.o(dot_product_attention(q, k, v, attend).reshape(b, t, self.h * self.hd))
        return x + self.mlp(self.norm2(x))


class GRTEncoder(nnx.Module):
    """Tiny ViT over a set of patch tokens per frame (random init unless trained).

    ``__call__(patches [B, L, P] float, positions [B, L] int patch index, times [B] seconds, mask [B, L] bool)``
    -> tokens [B, L, d] (zero at padding). Attention is bidirectional among the valid tokens of each row.
    Every token carries its patch position (learned table); its frame index travels with it as a tag
    (``BucketedEncoder.encode`` returns ``frame``/``patch`` per token), and ``time_embed=True`` also adds a
    sinusoidal embedding of the frame time to the token (off by default: the ViT never mixes frames, and a time
    term in a random-init token swamps content in mean-token statistics such as the merge JSD).
    """

    def __init__(self, *, patch_dim: int, num_patches: int, d_model: int = 64, num_layers: int = 2,
                 num_heads: int = 4, mlp_dim: int = 128, time_embed: bool = False, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"GRTEncoder: d_model={d_model} not divisible by num_heads={num_heads}")
        self.d_model, self.num_patches, self.time_embed = d_model, num_patches, time_embed
        self.embed = Dense(patch_dim, d_model, axes=(None, "embed"), rngs=rngs, use_bias=True)
        self.pos = param(rngs, jax.nn.initializers.normal(0.5), (num_patches, d_model), (None, "embed"))
        out_scale = 1.0 / (2 * num_layers) ** 0.5
        self.blocks = nnx.List([_EncoderBlock(d_model, num_heads, mlp_dim, rngs=rngs, out_scale=out_scale)
                                for _ in range(num_layers)])
        self.final_norm = RMSNorm(d_model)

    def __call__(self, patches: jax.Array, positions: jax.Array, times: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.embed(patches - 0.5) + jnp.take(self.pos[...], positions, axis=0)   # [B,L,d]
        if self.time_embed:
            x = x + time_embedding(times, self.d_model)[:, None, :]
        for blk in self.blocks:
            x = blk(x, mask)
        return jnp.where(mask[..., None], self.final_norm(x), 0.0)


def default_buckets(num_patches: int, smallest: int = 8) -> tuple[int, ...]:
    """Powers of two from ``smallest`` up to (and ending at) ``num_patches``."""
    out, b = [], smallest
    while b < num_patches:
        out.append(b)
        b *= 2
    return tuple(out) + (num_patches,)


class BucketedEncoder:
    """Runs a ``GRTEncoder`` over the gated token sets of a plan with bucketed padding.

    Each frame's set (its gated patches) is padded to the smallest bucket >= its size; frames of one bucket are
    batched ``batch_rows`` at a time (the last batch padded with empty rows), so the jitted call sees at most
    ``len(buckets)`` shapes. ``compiled_shapes`` lists the (rows, length) shapes seen; each new one is logged.
    """

    def __init__(self, model: GRTEncoder, buckets: Sequence[int] | None = None, batch_rows: int = 16):
        self.buckets = tuple(sorted(buckets or default_buckets(model.num_patches)))
        if self.buckets[-1] < model.num_patches:
            raise ValueError(f"BucketedEncoder: largest bucket {self.buckets[-1]} < num_patches "
                             f"{model.num_patches}")
        self.batch_rows = batch_rows
        self.d_model = model.d_model
        graphdef, self.state = nnx.split(model)
        self._fn = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a))
        self.compiled_shapes: list[tuple[int, int]] = []

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if n <= b:
                return b
        raise ValueError(f"BucketedEncoder: set of {n} tokens exceeds the largest bucket {self.buckets[-1]}")

    def encode(self, patches: np.ndarray, gate: np.ndarray, times: np.ndarray) -> dict:
        """patches [T, N, P] float, gate [T, N] bool, times [T] -> {"tokens" [M, d] (jax array, frame-major then
        patch order), "frame" [M], "patch" [M], "padded" (slots run incl. padding)}."""
        t_total, n, pdim = patches.shape
        counts = gate.sum(1)
        buckets = np.array([self.bucket(int(c)) if c else 0 for c in counts])
        outs, frames_out, patches_out = [], [], []
        padded = 0
        for b in self.buckets:
            rows = np.flatnonzero(buckets == b)
            for s in range(0, len(rows), self.batch_rows):
                chunk = rows[s:s + self.batch_rows]
                x = np.zeros((self.batch_rows, b, pdim), np.float32)
                pos = np.zeros((self.batch_rows, b), np.int32)
                mask = np.zeros((self.batch_rows, b), bool)
                tm = np.zeros((self.batch_rows,), np.float32)
                for r, t in enumerate(chunk):
                    idx = np.flatnonzero(gate[t])
                    x[r, :len(idx)] = patches[t, idx]
                    pos[r, :len(idx)] = idx
                    mask[r, :len(idx)] = True
                    tm[r] = times[t]
                    frames_out.append(np.full(len(idx), t))
                    patches_out.append(idx)
                shape = (self.batch_rows, b)
                if shape not in self.compiled_shapes:
                    self.compiled_shapes.append(shape)
                    logging.info("grt encoder: new compiled shape rows=%d length=%d (buckets %s)", *shape,
                                 self.buckets)
                y = self._fn(self.state, x, pos, tm, mask)                              # [rows, b, d]
                outs.append(y[jnp.asarray(mask)])
                padded += self.batch_rows * b
        if not outs:
            return {"tokens": jnp.zeros((0, self.d_model)), "frame": np.zeros(0, np.int64),
                    "patch": np.zeros(0, np.int64), "padded": 0}
        frame = np.concatenate(frames_out)
        patch = np.concatenate(patches_out)
        order = np.lexsort((patch, frame))
        tokens = jnp.concatenate(outs)[jnp.asarray(order)]
        return {"tokens": tokens, "frame": frame[order], "patch": patch[order], "padded": padded}


def key_token_means(encoded: dict, num_frames: int) -> np.ndarray:
    """[T, d] mean encoder token of each frame (zeros for frames with no tokens)."""
    tok = np.asarray(encoded["tokens"])
    out = np.zeros((num_frames, tok.shape[1]), np.float32)
    cnt = np.bincount(encoded["frame"], minlength=num_frames)
    np.add.at(out, encoded["frame"], tok)
    return out / np.maximum(cnt, 1)[:, None]


def window_features(encoded: dict, plan: TokenPlan, times: np.ndarray, window_ends: np.ndarray,
                    patches: np.ndarray) -> np.ndarray:
    """Probe features: for each window end, the mean over ``patches`` of the latest passed-on token at each
    position (a token canvas; merged key tokens replaced by their group's fused tokens). [W, d]."""
    tok = np.asarray(encoded["tokens"])
    frame, patch = encoded["frame"], encoded["patch"]
    num_frames, n = plan.gate.shape
    grid = np.zeros((num_frames, n, tok.shape[1]), np.float32)
    grid[frame, patch] = tok
    grid = key_content(grid.reshape(num_frames, n, -1), plan)
    written = plan.gate
    canvas = np.zeros((n, tok.shape[1]), np.float32)
    feats, t = [], 0
    for end in window_ends:
        while t < num_frames and times[t] < end - 1e-9:
            canvas = np.where(written[t][:, None], grid[t], canvas)
            t += 1
        feats.append(canvas[patches].mean(0))
    return np.stack(feats)
