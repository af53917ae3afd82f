"""Forward+backward time of the GLA op on this machine's CPU: chunked form, and the recurrence for context.

  python -m experiments.bench_gla                                  # default sweep, one JSON object on stdout
  python -m experiments.bench_gla --repeats=7 --out=/work/runs/gla_bench_before.json
  python -m experiments.bench_gla --shapes=8x128x4x16x32 --decays=scalar --segments=none

What is measured, per (impl, shape, decay kind, packing): one ``jax.jit`` of ``jax.vjp`` of
``kernels.gla.ops.gla(q, k, v, g, segment_ids=..., chunk_size=C, impl=...)`` with respect to ``q, k, v, g``,
evaluated together with the vjp applied to a fixed random cotangent (so forward and backward both run). Inputs are
float32 (the chunked form computes in float32 anyway); ``g`` is a GLA-style log-sigmoid gate divided by 16, either
per channel ``[B, T, H, K]`` ("vector") or one scalar per head ``[B, T, H]`` ("scalar"). With packing
("seg"), every row holds documents of random lengths (mean ~T/3). The time is the median of ``--repeats`` calls
after ``--warmup`` calls (the first compiles), each synchronised with ``block_until_ready``.

``impl="chunked"`` is what ``impl="auto"`` resolves to on CPU (``kernels.dispatch.resolve_impl``);
``impl="ref"`` (the per-token ``lax.scan``) is timed only at the ``--ref_shapes`` smallest shapes.

Output: one JSON object ``{"<impl> B<b>_T<t>_H<h>_K<k>_C<c> <decay> <packing>": ms, ...}`` plus ``"_meta"``
(load average before and after, jax version, repeats); shape keys are in sweep order. Times are wall-clock on a
shared machine: compare numbers within one run, or runs taken at a similar load average.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

# (B, T, H, K = V, chunk)
DEFAULT_SHAPES = ("8x128x4x16x32", "8x256x4x32x32", "8x256x4x32x64", "4x1024x4x64x64", "1x4096x4x64x64")


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_list("shapes", list(DEFAULT_SHAPES), "Shapes BxTxHxKxC (K = V; C = chunk size).")
    flags.DEFINE_list("decays", ["vector", "scalar"], "Decay kinds: vector ([B,T,H,K]) and/or scalar ([B,T,H]).")
    flags.DEFINE_list("segments", ["none", "seg"], "Packing: none (one document per row) and/or seg.")
    flags.DEFINE_list("impls", ["chunked", "ref"], "Implementations passed to gla(impl=...).")
    flags.DEFINE_integer("ref_shapes", 2, "impl=ref is timed only on the first this-many shapes.")
    flags.DEFINE_integer("warmup", 1, "Untimed calls first (the first one compiles).")
    flags.DEFINE_integer("repeats", 5, "Timed calls; the median is reported.")
    flags.DEFINE_string("out", None, "If set, also write the JSON object to this path.")


FLAGS = flags.FLAGS


def parse_shape(text: str) -> tuple[int, int, int, int, int]:
    """``"8x128x4x16x32"`` -> ``(8, 128, 4, 16, 32)`` (B, T, H, K = V, chunk)."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 5 or min(parts) < 1:
        raise ValueError(f"shape must be BxTxHxKxC with positive ints, got {text!r}")
    return parts  # type: ignore[return-value]


def make_inputs(shape: tuple[int, int, int, int, int], decay: str, packing: str, seed: int = 0):
    """Random float32 ``(q, k, v, g, segment_ids, do)`` for one benchmark point."""
    import jax.numpy as jnp
    import numpy as np

    batch, length, heads, dim, _ = shape
    rng = np.random.default_rng(seed)

    def normal(*s):
        return jnp.asarray(rng.standard_normal(s), jnp.float32)

    q, k, v = normal(batch, length, heads, dim), normal(batch, length, heads, dim), normal(batch, length, heads, dim)
    g_shape = (batch, length, heads, dim) if decay == "vector" else (batch, length, heads)
    g = jnp.asarray(-np.logaddexp(0.0, -rng.standard_normal(g_shape)) / 16.0, jnp.float32)  # log-sigmoid / 16
    seg = None
    if packing == "seg":
        ids = np.zeros((batch, length), np.int32)
        for b in range(batch):
            starts = np.sort(rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False))
            for s in starts:
                ids[b, s:] += 1
        seg = jnp.asarray(ids)
    return q, k, v, g, seg, normal(batch, length, heads, dim)


def time_point(impl: str, shape, decay: str, packing: str, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of one jitted forward+backward of ``gla`` at one point."""
    import jax

    from kernels.gla import ops

    chunk = shape[-1]
    q, k, v, g, seg, do = make_inputs(shape, decay, packing)

    @jax.jit
    def fwd_bwd(q, k, v, g, seg, do):
        def f(q, k, v, g):
            return ops.gla(q, k, v, g, segment_ids=seg, chunk_size=chunk, impl=impl)[0]

        o, vjp = jax.vjp(f, q, k, v, g)
        return o, vjp(do)

    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd_bwd(q, k, v, g, seg, do))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def point_key(impl: str, shape, decay: str, packing: str) -> str:
    """The JSON key of one point, e.g. ``"chunked B8_T128_H4_K16_C32 vector none"``."""
    b, t, h, d, c = shape
    return f"{impl} B{b}_T{t}_H{h}_K{d}_C{c} {decay} {packing}"


def run_benchmark(shapes, decays, segments, impls, *, ref_shapes: int, warmup: int, repeats: int) -> dict:
    """Times every point; returns ``{key: ms}`` plus ``"_meta"``."""
    import jax

    if warmup < 1 or repeats < 1:
        raise ValueError(f"need warmup >= 1 and repeats >= 1, got {warmup}, {repeats}")
    load_start = os.getloadavg()
    record: dict = {}
    for impl in impls:
        for i, shape in enumerate(shapes):
            if impl == "ref" and i >= ref_shapes:
                continue
            for decay in decays:
                for packing in segments:
                    ms = time_point(impl, shape, decay, packing, warmup=warmup, repeats=repeats)
                    record[point_key(impl, shape, decay, packing)] = round(ms, 2)
    record["_meta"] = {"load_avg_start": [round(x, 2) for x in load_start],
                       "load_avg_end": [round(x, 2) for x in os.getloadavg()],
                       "warmup": warmup, "repeats": repeats, "jax": jax.__version__,
                       "backend": jax.default_backend(), "cpus": os.cpu_count()}
    return record


def main(argv):
    del argv
    shapes = [parse_shape(s) for s in FLAGS.shapes]
    for name, values, allowed in (("decays", FLAGS.decays, ("vector", "scalar")),
                                  ("segments", FLAGS.segments, ("none", "seg")),
                                  ("impls", FLAGS.impls, ("chunked", "ref", "interpret"))):
        bad = [x for x in values if x not in allowed]
        if bad:
            raise app.UsageError(f"--{name}: unknown {bad}; expected some of {allowed}")
    record = run_benchmark(shapes, FLAGS.decays, FLAGS.segments, FLAGS.impls, ref_shapes=FLAGS.ref_shapes,
                           warmup=FLAGS.warmup, repeats=FLAGS.repeats)
    text = json.dumps(record, indent=1)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
