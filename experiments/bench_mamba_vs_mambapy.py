"""Forward + backward time of our Mamba (S6) mixer against the PyTorch package ``mambapy``, on CPU.

Both sides run the same block (papers/mamba_free_lunch.md §3.1: in-proj, depthwise causal conv, SiLU,
selection projections, softplus delta, selective scan, D skip, SiLU(z) gate, out-proj) with the same
d_model / d_state / expand / d_conv, the same batch and T, float32, and the *same weights*: mambapy's
weights are copied into ours and the outputs are compared before timing (``max_abs_diff``). One timed
iteration = forward, a random-cotangent backward to every parameter and the input. The two sides are
timed alternately (ours, theirs, ours, ...) so that load from other processes hits both alike; the
median is reported.

* ours: ``sqattn.mixers.mamba.Mamba`` under ``jax.jit``, ``impl="chunked"`` (the CPU default) by
  default; ``--impls=chunked,ref`` adds rows for other impls. Compile time is excluded (warm-up).
* mambapy: ``mambapy.mamba.MambaBlock`` (parallel ``pscan``, its default), eager PyTorch on CPU.

torch and mambapy are *not* sqattn dependencies. To run this benchmark install them first (the CPU
build of torch; do not let pip pull a CUDA build):

  pip install torch==2.13.0          # a local CPU wheel of this version is in /opt/wheels here
  pip install mambapy --no-deps

  python -m experiments.bench_mamba_vs_mambapy                      # T in {256, 1024}
  python -m experiments.bench_mamba_vs_mambapy --seq_lens=512 --batch=8 --reps=7

Prints one JSON object: settings, versions, and per (T, impl) the median ms of both sides and
``speedup`` = mambapy_ms / ours_ms (> 1: ours is faster).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_integer("d_model", 128, "Model width D.")
    flags.DEFINE_integer("d_state", 16, "SSM state size N.")
    flags.DEFINE_integer("expand", 2, "D_in = expand * D.")
    flags.DEFINE_integer("d_conv", 4, "Depthwise conv width.")
    flags.DEFINE_integer("batch", 4, "Batch size.")
    flags.DEFINE_list("seq_lens", ["256", "1024"], "Sequence lengths T.")
    flags.DEFINE_list("impls", ["chunked"], "Our selective_scan impls to time (the first is the headline).")
    flags.DEFINE_integer("chunk_size", 8, "chunk_size of our chunked selective scan (8 measured fastest on "
                         "CPU: fwd+bwd of the op at T=128 took 1.1 / 1.7 / 2.6 / 2.9 s for 8 / 16 / 32 / 64).")
    flags.DEFINE_integer("reps", 5, "Timed iterations per side (after warm-up).")
    flags.DEFINE_integer("threads", 0, "torch intra-op threads (0 = os.cpu_count(), what XLA:CPU uses).")
    flags.DEFINE_integer("seed", 0, "Seed of weights and inputs.")


FLAGS = flags.FLAGS

INSTALL_HINT = ("this benchmark needs PyTorch and mambapy, which are not sqattn dependencies. Install the CPU "
                "build of torch and mambapy without its dependencies:\n"
                "  pip install torch==2.13.0        # CPU wheel; do not let pip pull a CUDA build\n"
                "  pip install mambapy --no-deps")


def _import_torch_side():
    try:
        import torch
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError as e:
        raise ImportError(f"{e}.\n{INSTALL_HINT}") from e
    return torch, MambaBlock, MambaConfig


def copy_weights(ours, theirs) -> None:
    """Loads mambapy ``MambaBlock`` weights into our ``Mamba`` mixer (same math, our layouts)."""
    import jax.numpy as jnp

    def arr(t):
        return jnp.asarray(t.detach().cpu().numpy())

    e = ours.d_inner
    w_in = arr(theirs.in_proj.weight)                      # [2e, d]: rows [x; z]
    ours.in_x.kernel[...] = w_in[:e].T                      # [d, e]
    ours.in_z.kernel[...] = w_in[e:].T                      # [d, e]
    ours.conv.kernel[...] = arr(theirs.conv1d.weight)[:, 0, :].T   # [e, 1, W] -> [W, e]; last tap = x_t
    ours.conv.bias[...] = arr(theirs.conv1d.bias)
    ours.x_proj.kernel[...] = arr(theirs.x_proj.weight).T   # [r + 2n, e] -> [e, r + 2n]
    ours.dt_proj.kernel[...] = arr(theirs.dt_proj.weight).T  # [e, r] -> [r, e]
    ours.dt_proj.bias[...] = arr(theirs.dt_proj.bias)
    ours.A_log[...] = arr(theirs.A_log)
    ours.D[...] = arr(theirs.D)
    ours.out_proj.kernel[...] = arr(theirs.out_proj.weight).T  # [d, e] -> [e, d]


def _median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def bench(seq_len: int, impl: str = "chunked", *, d_model: int = 128, d_state: int = 16, expand: int = 2,
          d_conv: int = 4, batch: int = 4, chunk_size: int = 8, reps: int = 5, seed: int = 0) -> dict:
    """One (T, impl) row: median fwd+bwd ms of ours and of mambapy on the same weights and inputs.

    Raises:
      ImportError: torch or mambapy is not installed (the message says how to install them).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sqattn.mixers.mamba import Mamba

    torch, MambaBlock, MambaConfig = _import_torch_side()
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand,
                      d_conv=d_conv, pscan=True)
    theirs = MambaBlock(cfg).float()
    ours = Mamba(d_model, rngs=nnx.Rngs(seed), d_state=d_state, expand=expand,
                 d_conv=d_conv, dt_rank=cfg.dt_rank, chunk_size=chunk_size, impl=impl)
    copy_weights(ours, theirs)

    rng = np.random.default_rng(seed)
    shape = (batch, seq_len, d_model)
    x_np = rng.standard_normal(shape).astype(np.float32)
    g_np = rng.standard_normal(shape).astype(np.float32)  # output cotangent

    # --- ours: jitted forward + VJP to every parameter and the input.
    graphdef, params = nnx.split(ours, nnx.Param)

    def fwd(p, x):
        return nnx.merge(graphdef, p)(x)

    @jax.jit
    def fwd_bwd(p, x, g):
        y, vjp = jax.vjp(fwd, p, x)
        return y, vjp(g)

    x_j, g_j = jnp.asarray(x_np), jnp.asarray(g_np)

    def run_ours():
        t = time.perf_counter()
        jax.block_until_ready(fwd_bwd(params, x_j, g_j))
        return time.perf_counter() - t

    # --- theirs: eager forward + backward.
    x_t = torch.tensor(x_np, requires_grad=True)
    g_t = torch.tensor(g_np)

    def run_theirs():
        theirs.zero_grad(set_to_none=True)
        x_t.grad = None
        t = time.perf_counter()
        y = theirs(x_t)
        y.backward(g_t)
        return time.perf_counter() - t

    # Same weights -> same outputs (a check that both sides do the same work).
    y_ours = np.asarray(jax.jit(fwd)(params, x_j))
    with torch.no_grad():
        y_theirs = theirs(torch.tensor(x_np)).numpy()
    max_abs_diff = float(np.max(np.abs(y_ours - y_theirs)))
    ref_scale = float(np.max(np.abs(y_theirs)))

    t0 = time.perf_counter()
    run_ours()  # compile
    compile_s = time.perf_counter() - t0
    run_ours()
    run_theirs()
    run_theirs()
    ours_t, theirs_t = [], []
    for _ in range(reps):
        ours_t.append(run_ours())
        theirs_t.append(run_theirs())
    ours_ms, theirs_ms = _median_ms(ours_t), _median_ms(theirs_t)
    return dict(seq_len=seq_len, impl=impl, ours_ms=ours_ms, mambapy_ms=theirs_ms,
                speedup=theirs_ms / ours_ms, ours_ms_all=[1000 * t for t in ours_t],
                mambapy_ms_all=[1000 * t for t in theirs_t], ours_compile_s=compile_s,
                max_abs_diff=max_abs_diff, output_max_abs=ref_scale)


def main(argv):
    del argv
    try:
        torch, _, _ = _import_torch_side()
    except ImportError as e:
        sys.exit(f"error: {e}")
    import jax
    import mambapy
    threads = FLAGS.threads or os.cpu_count()
    torch.set_num_threads(threads)
    kw = dict(d_model=FLAGS.d_model, d_state=FLAGS.d_state, expand=FLAGS.expand, d_conv=FLAGS.d_conv,
              batch=FLAGS.batch, chunk_size=FLAGS.chunk_size, reps=FLAGS.reps, seed=FLAGS.seed)
    rows = [bench(int(t), impl, **kw) for t in FLAGS.seq_lens for impl in FLAGS.impls]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    out = {
        "settings": dict(d_model=FLAGS.d_model, d_state=FLAGS.d_state, expand=FLAGS.expand,
                         d_conv=FLAGS.d_conv, batch=FLAGS.batch, chunk_size=FLAGS.chunk_size,
                         reps=FLAGS.reps, dtype="float32", torch_threads=threads,
                         timed="forward + backward (params and input), median"),
        "versions": dict(jax=jax.__version__, torch=torch.__version__,
                         mambapy=getattr(mambapy, "__version__", "unknown"), backend=jax.default_backend()),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "results": rows,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    define_flags()
    app.run(main)
