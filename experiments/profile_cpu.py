"""Where the time of a compiled program goes on this CPU: XLA kernel time by kind, from a jax.profiler trace.

  python -m experiments.profile_cpu                                  # lm_tiny bf16 train step + attention T=4096
  python -m experiments.profile_cpu --parts=attention --seq_len=1024 --attn_tokens=8192
  python -m experiments.profile_cpu --parts=step --config=sse_h_tiny --dtype=float32

Runs the program a few times under ``jax.profiler.trace(create_perfetto_trace=True)``, reads the perfetto
trace's per-kernel events (XLA:CPU's thunks: ``dot_general.N``, ``ynn_fusion.N`` (YNNPACK matmul fusions),
``*_convert_fusion``, ...), and sums their durations per call into kinds: ``matmul``, ``converts`` (any fusion
whose name has ``convert``), ``copies`` (copy / transpose / concatenate), ``exp``, ``other`` (elementwise,
reduce, select, scatter). Kernels of the two XLA threads are summed, so ``kernel_ms_per_call`` can exceed the
wall time. One JSON object per part, the last line all of them; ``--workdir`` keeps the traces (for
Perfetto / TensorBoard), else they go to a temporary directory.

The parts are the programs ``experiments.bench_vs_torch`` times against PyTorch: the trainer's jitted step
(``step``) and ``kernels.causal_attention`` forward + backward, bf16 inputs, 4 query / 2 kv heads of 32
(``attention``).

Measured 2026-12-03 (load average 5-6: two other agents' test jobs on the 2 cores, so the absolute times are
~2x a quiet machine's; the shares are what matters):

  | program                                   | matmul | converts | copies | exp  | other | kernel ms / call |
  | lm_tiny train step, bf16, 16 x 128        | 40%    | 32%      | 18%    | 0.3% | 9%    | 515              |
  | attention fwd+bwd, bf16, T = 4096, 2 rows | 55%    | 25%      | -      | 7%   | 14%   | 1575             |

* Attention: the matmuls alone (0.86 s per call for ~30 GFLOP: ~35 GFLOP/s at this load) take longer than
  SDPA's whole fwd+bwd at the same load (0.67 s). Its contractions are batched [256 x 128] x [128 x 32] tiles
  (head dim 32), which XLA:CPU runs as separate dot kernels, then converts, masks, max/exp/sum as further
  fusions, each a pass over [b, n, g, r*B, B] float32 scores in memory; SDPA's C++ flash kernel keeps a tile
  in cache from QK^T to PV. Block sizes 32 / 64 / 128 / 256 give 88 / 62 / 67 / 76 us/token at T = 1024 and
  240 / 201 / 199 / 217 at T = 4096 against SDPA's 34 / 82 (same process, interleaved, load 5): no tile
  size closes the gap. On CPU, beating SDPA needs a fused kernel, which XLA:CPU has no way to express
  (Pallas runs on CPU only in the interpreter).
* Step: a third of the kernel time is dtype converts, 508 convert kernels per step. The largest are on
  activations (the residual adds of the backward pass, ``jax.nn.silu``'s divide, the Dense outputs), not on
  parameters (lm_tiny's 0.82M parameters are one 3 MB cast). Dropping the Dense layer's float32 dot output
  (a bf16 x bf16 -> bf16 dot instead of f32 + convert) measured 0.2708 / 0.3441 s (min / median) against
  0.2538 / 0.3325 s: no gain, so it was not kept.

**Compile time of the default job** (``sse_h_tiny``; the trainer now logs trace + lower and XLA apart):

  python -m experiments.train --config=sse_h_tiny --config.num_steps=2 --compilation_cache=/tmp/ccold  (twice)
  cold: 25.07 s = trace + lower 3.93 s + XLA 21.14 s;  warm (persistent cache hit): 5.83 s = 3.86 + 1.97 s
  (12:52 UTC, load 0.15 -> 1.2, before the helpers started). Goal 3 s / 1 s: not met.

* XLA's time is LLVM code generation, not HLO passes: for one SSE layer's fwd+bwd the HLO passes take 0.5 s
  and the backend ~9.4 s for ~220 kernel modules (``TF_CPP_VMODULE=cpu_compiler=1``). One attention layer
  compiles in ~3 s, one SSE layer (sorted form) in 11-19 s: the SSE mixer's distinct kernels are the cold cost.
* **Scanned layers do not help on XLA:CPU.** XLA:CPU already compiles identical kernels once: lm_tiny f32
  with 4 vs 16 layers, unscanned, compiled in 3.15 / 3.84 s and 2.77 / 5.60 s (interleaved, load 5). With
  ``model.scan_layers=True`` (``sqattn.models.lm.scan_blocks``; same function, tested) the while-loop
  machinery *adds* kernels: lm_tiny 8.4 -> 19.7 s, sse_h_tiny (f32) 27.8 -> 48.9 s of XLA time (one process,
  load 4-5), while trace + lower halves (4.15 -> 2.04 s). The trainer runs, cold / warm, at load 4.3-5.9:
  scan off 50.1 / 24.4 s and 82.1 / 13.7 s, scan on 85.7 / 19.3 s and 57.8 / 6.8 s: within the noise of the
  load. The option stays off by default; it is there for deep models on TPU/GPU, where compile time grows
  with the unrolled depth (unmeasured here: no accelerator was lent).
* Warm, what remains is Python: tracing and lowering the model (3.9 s) plus loading the cached executable
  (2.0 s); the persistent cache cannot skip the first.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("parts", ["step", "attention"], "What to profile: step, attention.")
    flags.DEFINE_string("config", "lm_tiny", "Config whose train step is profiled (part 'step').")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype of the step.")
    flags.DEFINE_integer("seq_len", 4096, "Attention sequence length (part 'attention').")
    flags.DEFINE_integer("attn_tokens", 8192, "Attention tokens per call (batch = attn_tokens // seq_len).")
    flags.DEFINE_integer("calls", 5, "Profiled calls (after 3 warm-up calls).")
    flags.DEFINE_integer("top", 8, "Largest kernels listed per part.")
    flags.DEFINE_string("workdir", "", "Keep the traces here (default: a temporary directory).")


def kind_of(kernel: str) -> str | None:
    """The kind of an XLA:CPU trace event, or None for events that are not kernels (executor, Python, loops)."""
    if kernel.startswith(("ThunkExecutor", "$", "while", "call", "conditional")):
        return None
    if kernel.startswith(("dot", "ynn_fusion", "custom-call")) or "dot" in kernel:
        return "matmul"
    if "convert" in kernel:
        return "converts"
    if any(w in kernel for w in ("copy", "transpose", "concatenate")):
        return "copies"
    if "exponential" in kernel:
        return "exp"
    return "other"


def kernel_times(trace_dir: str) -> dict[str, float]:
    """Summed duration (us) of every complete event in the newest perfetto trace under ``trace_dir``."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no perfetto trace (*.trace.json.gz) was written under {trace_dir}")
    with gzip.open(files[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            total[e["name"]] += float(e["dur"])
    return dict(total)


def summarize(times: dict[str, float], calls: int, top: int) -> dict:
    kinds: collections.Counter = collections.Counter()
    kernels = {}
    for name, us in times.items():
        kind = kind_of(name)
        if kind is not None:
            kinds[kind] += us
            kernels[name] = us
    total = sum(kinds.values())
    if total <= 0:
        raise RuntimeError("the trace holds no XLA kernel events")
    return {
        "kernel_ms_per_call": round(total / calls / 1e3, 2),
        "share": {k: round(v / total, 4) for k, v in kinds.most_common()},
        "kernels": len(kernels),
        "converts": sum(1 for k in kernels if kind_of(k) == "converts"),
        "top": [[k, round(v / calls / 1e3, 2)] for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]],
    }


def _step_program(config: str, dtype: str):
    from experiments import bench_vs_torch
    run, info = bench_vs_torch._ours_step({"config": config, "dtype": dtype})
    return run, {"config": config, "dtype": dtype, "tokens": info["tokens"]}


def _attention_program(seq_len: int, tokens: int):
    from experiments import bench_vs_torch
    run, info = bench_vs_torch._ours_attention({"batch": max(tokens // seq_len, 1), "T": seq_len})
    return run, {"seq_len": seq_len, "tokens": info["tokens"]}


def profile(run, calls: int, trace_dir: str, top: int) -> dict:
    import jax
    for _ in range(3):
        run()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            run()
    return summarize(kernel_times(trace_dir), calls, top)


def main(argv) -> None:
    del argv
    unknown = set(FLAGS.parts) - {"step", "attention"}
    if unknown:
        raise app.UsageError(f"--parts: unknown part(s) {sorted(unknown)}; expected step, attention")
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="sqattn_profile_")
    results = {"loadavg_start": round(os.getloadavg()[0], 2)}
    for part in FLAGS.parts:
        if part == "step":
            run, info = _step_program(FLAGS.config, FLAGS.dtype)
        else:
            run, info = _attention_program(FLAGS.seq_len, FLAGS.attn_tokens)
        info.update(profile(run, FLAGS.calls, os.path.join(root, part), FLAGS.top))
        print(json.dumps({part: info}), flush=True)
        results[part] = info
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    results["traces"] = root
    print(json.dumps(results))


if __name__ == "__main__":
    define_flags()
    app.run(main)
