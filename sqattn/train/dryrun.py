"""``--dry_run``: build the model abstractly and report its size, memory and FLOPs without allocating it.

Activation memory of one train step (``activation_memory``) comes from autodiff itself, abstractly: the
residuals ``jax.grad`` saves for the backward pass under the model's remat policy
(``jax.ad_checkpoint``'s ``saved_residuals``), traced at the full sequence length and per-device micro-batch
without compiling or allocating anything. It is traced in parts, so the 2B model takes seconds: the LM head
and loss once, and each distinct block kind once (what its backward recomputes and holds when rematerialised).
The parts compose as

  saved     = residual stream (one [rows, T, d] per block under remat, else every block's residuals)
              + the head's and loss' residuals (log-softmax [rows, T, V] f32, final norm)
  transient = max(logits cotangent [rows, T, V] f32,  largest block's residuals + its in/out cotangents)
  weights   = compute-dtype copies of weights the head keeps for its backward (the bf16 output head)
  total     = saved + transient + weights

It counts what autodiff keeps, not the temporaries a backward creates beyond its residuals, so it is a lower
bound of what XLA allocates. Compiling the gradient at a reduced size (``measure_activations``, CPU), the
growth of the compiled temp memory was 1.04x the estimate's for sse_h_2b (2 layers "SA" at full widths, one
row, seq 128 -> 256: the log-softmax and the SSE block dominate, and they are residuals), but 1.8x (seq
64 -> 128) and 2.3x (128 -> 256) for lm_tiny's small attention + SwiGLU block, whose backward (the chunked
attention's on CPU) holds temporaries that grow faster than its residuals.

``measure_activations`` is that check: it compiles the gradient of the loss at a reduced size (one block of
each kind the pattern uses, short sequences, one row, one device) and compares the growth of the compiled
program's temp memory between two sequence lengths with the estimate's; ``dry_run(measure=True)`` reports the
full-size estimate times that ratio (``activation_bytes_scaled``). That check runs the host's (CPU) mixers;
``activation_memory(target="tpu"|"gpu")`` traces the Pallas kernels a TPU/GPU run uses instead.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sqattn.configs.validate import validate
from sqattn.moe import inactive_params
from sqattn.train import state as state_lib


def dry_run(config, *, check_devices: bool = True, activations: bool = True, measure: bool = False,
            target: str | None = None) -> dict:
    """Returns {"params", "bytes_per_device", "flops_per_token", ...} for ``config`` (nothing allocated).

    ``activations``: add ``activation_memory`` (traced, seconds for a 2B model) and the per-device total of
    one step (params + optimizer state + gradients + activations). ``measure``: also compile the reduced-size
    check ``measure_activations`` (minutes for a 2B model) and report the estimate scaled by its ratio.
    ``target`` ("tpu", "gpu", "cpu"; default this host's): the platform whose mixer implementations the
    activation estimate traces (a CPU host planning a TPU run passes "tpu").
    """
    validate(config, check_devices=check_devices)
    setup = state_lib.make_setup(config)
    model_view = nnx.merge(setup.graphdef, setup.abstract_params)
    seq_len = int(config.data.get("seq_len", 1)) if "data" in config else 1
    params_bytes = state_lib.per_device_bytes(setup.abstract_state["params"], setup.state_shardings["params"])
    total_bytes = state_lib.per_device_bytes(setup.abstract_state, setup.state_shardings)
    groups: dict[str, int] = defaultdict(int)
    for path, x in jax.tree_util.tree_leaves_with_path(setup.abstract_state["params"]):
        groups[str(getattr(path[0], "key", path[0]))] += math.prod(x.shape)
    tokens = int(config.batch_size) * seq_len
    fpt = state_lib.flops_per_token(model_view, setup.abstract_params, seq_len)
    act = activation_memory(config, setup, target=target) if activations else None
    extra = {}
    if act is not None:
        extra = {"activations": act, "activation_bytes_per_device": act["total"], "activations_target": target
                 or jax.default_backend(),
                 "step_bytes_per_device": total_bytes + params_bytes + act["total"]}
        if measure:
            m = measure_activations(config)
            extra.update(activations_measured=m, activation_bytes_scaled=int(act["total"] * m["ratio"]))
    return {
        "config": config.name,
        "params": state_lib.param_count(setup.abstract_params),
        "matmul_params": state_lib.matmul_param_count(setup.abstract_params),
        "active_params": state_lib.param_count(setup.abstract_params) - inactive_params(model_view),
        "bytes_per_device": total_bytes,
        "param_bytes_per_device": params_bytes,
        "grad_bytes_per_device": params_bytes,
        "flops_per_token": fpt,
        "seq_len": seq_len,
        "tokens_per_step": tokens,
        "step_flops": fpt * tokens,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "devices": jax.device_count(),
        "param_groups": dict(groups),
        **extra,
    }


def format_report(rep: dict) -> str:
    """A human table followed, as its last line, by one JSON object."""
    rows = [("config", rep["config"]), ("parameters", f"{rep['params']:,}"),
            ("matmul parameters", f"{rep['matmul_params']:,}"),
            ("active parameters / token", f"{rep['active_params']:,}"),
            ("mesh", " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())),
            ("params / device", f"{rep['param_bytes_per_device'] / 2**20:,.1f} MiB"),
            ("params+opt / device", f"{rep['bytes_per_device'] / 2**20:,.1f} MiB"),
            ("train FLOPs / token", f"{rep['flops_per_token']:.4g} (seq_len {rep['seq_len']})")]
    act = rep.get("activations")
    if act is not None:
        mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
        rows += [(f"activations / device ({rep.get('activations_target', '?')})",
                  f"{mib(act['total'])} ({act['rows']} x {act['seq_len']} tokens: saved "
                                          f"{mib(act['saved'])}, transient {mib(act['transient'])}, weight "
                                          f"copies {mib(act['weights'])})"),
                 ("step total / device", f"{mib(rep['step_bytes_per_device'])} (params + opt + grads + "
                                         f"activations)")]
        if "activations_measured" in rep:
            m = rep["activations_measured"]
            rows.append(("activations, XLA-checked", f"{mib(rep['activation_bytes_scaled'])} (compiled/estimated "
                                                     f"growth {m['ratio']:.3f} at {m['layers']} layers, seq "
                                                     f"{m['seq_lens']})"))
    rows.append(("tokens / step, FLOPs / step", f"{rep['tokens_per_step']:,}, {rep['step_flops']:.4g}"))
    rows += [(f"  {k}", f"{v:,}") for k, v in sorted(rep["param_groups"].items())]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    summary = {k: rep[k] for k in ("config", "params", "active_params", "bytes_per_device", "flops_per_token",
                                   "mesh", "param_bytes_per_device", "seq_len", "tokens_per_step", "step_flops",
                                   "activation_bytes_per_device", "step_bytes_per_device",
                                   "activation_bytes_scaled", "activations_target") if k in rep}
    return "\n".join(lines + [json.dumps(summary)])


# ------------------------------------------------------------------------------------------ activation memory
def rows_per_device(config, mesh_shape) -> int:
    """Sequences one device runs forward and backward at once: the step batch over the data-parallel axes
    (``data`` x ``fsdp``) and over ``optim.grad_accum`` micro-batches, rounded up."""
    dp = int(mesh_shape.get("data", 1)) * int(mesh_shape.get("fsdp", 1))
    accum = max(1, int(config.optim.get("grad_accum", 1)))
    return max(1, -(-int(config.batch_size) // (dp * accum)))


def _residual_bytes(fn, *args, weight_shapes=frozenset()) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) of the residuals ``jax.grad(fn)`` saves for its backward pass,
    its arguments (parameters, batch, input) excluded. A float residual shaped like a parameter (either way
    round) is a weight copy (e.g. the bf16 cast of a float32 kernel), not an activation."""
    from jax._src.ad_checkpoint import saved_residuals  # the function behind jax.ad_checkpoint.print_saved_residuals
    act = wts = 0
    for aval, where in saved_residuals(fn, *args):
        if where.startswith("from the argument"):
            continue
        n = math.prod(aval.shape) * np.dtype(aval.dtype).itemsize
        if tuple(aval.shape) in weight_shapes and jnp.issubdtype(aval.dtype, jnp.floating):
            wts += n
        else:
            act += n
    return act, wts


def _lm_batch(rows: int, seq_len: int) -> dict:
    tok = jax.ShapeDtypeStruct((rows, seq_len), jnp.int32)
    return {"inputs": tok, "targets": tok, "weights": jax.ShapeDtypeStruct((rows, seq_len), jnp.float32)}


def activation_memory(config, setup: state_lib.Setup | None = None, *, target: str | None = None,
                      whole: bool = False) -> dict | None:
    """Per-device bytes of the activations of one train step of an LM config (abstract; nothing compiled).

    Returns ``{"rows", "seq_len", "saved", "transient", "weights", "total", "parts"}`` (bytes; see the module
    docstring for what each holds), or ``None`` for a task whose batch layout this does not know (not "lm")
    or a config without ``data.seq_len``. ``total`` is what one device needs for activations on top of its
    parameters, optimizer state and gradients; the trainer's memory check adds it to those.
    Assumes tensor parallelism splits the vocabulary (logits) and the blocks' internals, not the residual stream.
    ``target`` ("tpu", "gpu", "cpu"; default: this host's) picks the mixers' implementation as a run there
    would (``kernels.dispatch.lowering_target``): the Pallas kernels on TPU/GPU, the chunked jnp forms on CPU,
    whose saved intermediates are much larger. ``whole``: trace the whole loss at once instead of in parts
    (``saved`` and ``weights`` exact, no ``transient``; slower: what the parts are checked against).
    """
    if target is not None:
        from kernels import dispatch as kernel_dispatch
        with kernel_dispatch.lowering_target(target):
            return activation_memory(config, setup, whole=whole)
    from sqattn.models.lm import LM
    from sqattn.train import tasks as tasks_lib
    if config.get("task", "lm") != "lm" or "seq_len" not in config.get("data", {}):
        return None
    setup = setup or state_lib.make_setup(config)
    rows, seq = rows_per_device(config, setup.mesh.shape), int(config.data.seq_len)
    tensor = int(setup.mesh.shape.get("tensor", 1))
    graphdef, params = setup.graphdef, nnx.to_pure_dict(setup.abstract_params)
    wshapes = frozenset(s for x in jax.tree.leaves(params) for s in (tuple(x.shape), tuple(x.shape)[::-1]))
    batch = _lm_batch(rows, seq)
    model = nnx.merge(graphdef, setup.abstract_params)

    def loss_sum(p, b):
        return tasks_lib.get_task("lm").loss_fn(nnx.merge(graphdef, p), b, None)[0]

    if whole or not isinstance(model, LM):  # trace the whole loss (exact, slower)
        act, wts = _residual_bytes(loss_sum, params, batch, weight_shapes=wshapes)
        return {"rows": rows, "seq_len": seq, "saved": act, "transient": 0, "weights": wts, "total": act + wts,
                "parts": {"whole model": act}}

    d = int(config.model.d_model)
    vocab = model.padded_vocab
    x = jax.ShapeDtypeStruct((rows, seq, d), model.dtype)
    f32_stream = rows * seq * d * 4

    def head_loss(p, h, b):
        logits = nnx.merge(graphdef, p).logits(h)
        return tasks_lib.weighted_cross_entropy(logits, b["targets"], b["weights"])[0]

    head_act, head_w = _residual_bytes(head_loss, params, x, batch, weight_shapes=wshapes)
    vocab_div = tensor if vocab % tensor == 0 else 1
    head_act //= vocab_div
    parts = {"head+loss": head_act}
    kinds: dict[tuple, tuple[int, int, int]] = {}       # kind -> (first block index, residual bytes, count)
    block_w = 0
    for i, blk in enumerate(model.blocks):
        kind = (blk.letter, type(blk.mlp).__name__)
        if kind in kinds:
            first, nbytes, count = kinds[kind]
            kinds[kind] = (first, nbytes, count + 1)
            continue

        def block_out(p, h, i=i):
            out = nnx.merge(graphdef, p).blocks[i](h, None, None)
            return jnp.sum(out.astype(jnp.float32))
        act, wts = _residual_bytes(block_out, params, x, weight_shapes=wshapes)
        kinds[kind] = (i, act // tensor, 1)
        block_w = max(block_w, wts)
    for (letter, mlp), (_, nbytes, count) in kinds.items():
        parts[f"block {letter}{'' if mlp in ('SwiGLU', 'NoneType') else '+' + mlp}"] = nbytes
    stream = rows * seq * d * np.dtype(model.dtype).itemsize
    if model.remat:   # each block keeps its input; its internals are recomputed, one block at a time
        saved = len(model.blocks) * stream + head_act
        block_peak = max(nbytes for _, nbytes, _ in kinds.values()) + 2 * f32_stream
        weights = head_w
    else:
        saved = sum(nbytes * count for _, nbytes, count in kinds.values()) + stream + head_act
        block_peak = 2 * f32_stream
        weights = head_w + block_w * len(model.blocks)
    transient = max(rows * seq * vocab * 4 // vocab_div, block_peak)
    return {"rows": rows, "seq_len": seq, "saved": int(saved), "transient": int(transient),
            "weights": int(weights), "total": int(saved + transient + weights), "parts": parts}


def _reduced_config(config, seq_len: int):
    """``config`` at one sequence of ``seq_len`` on one device, with one block of each kind the pattern uses
    (in pattern order; an LM's residual stream is the only per-block cost remat keeps, so kinds suffice)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        m = c.model
        if "block_pattern" in m and "num_layers" in m:
            kinds = "".join(dict.fromkeys(m.block_pattern))
            m.block_pattern, m.num_layers = kinds, len(kinds)
        c.data.seq_len = seq_len
        c.batch_size = 1
        c.optim.grad_accum = 1
        c.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
    return c


def measure_activations(config, seq_lens: tuple[int, int] = (128, 256)) -> dict:
    """Checks ``activation_memory`` against XLA's compiled memory analysis at a reduced size.

    For each of two sequence lengths, compiles ``grad(loss)`` of ``_reduced_config`` on one device (nothing is
    run or allocated) and reads its temp bytes. Between the two lengths the compiled temp memory and the
    estimate's total should grow alike (what does not depend on tokens, e.g. weight casts, cancels);
    ``ratio`` = compiled growth / estimated growth. Compiling a 2B model's two blocks takes ~1 min each on
    2 CPU cores.
    """
    from sqattn.train import tasks as tasks_lib
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"))
    temps, ests, secs = [], [], []
    layers = None
    for seq in seq_lens:
        c = _reduced_config(config, seq)
        setup = state_lib.make_setup(c, mesh)
        layers = int(c.model.get("num_layers", 0)) or None
        graphdef = setup.graphdef
        task = tasks_lib.get_task(c.task)

        def grads(p, b):
            return jax.grad(lambda q: task.loss_fn(nnx.merge(graphdef, q), b, None)[0])(p)
        t0 = time.perf_counter()
        compiled = jax.jit(grads).lower(setup.abstract_state["params"], _lm_batch(1, seq)).compile()
        secs.append(round(time.perf_counter() - t0, 1))
        temps.append(int(compiled.memory_analysis().temp_size_in_bytes))
        ests.append(activation_memory(c, setup)["total"])
    grow_c, grow_e = temps[1] - temps[0], ests[1] - ests[0]
    return {"seq_lens": list(seq_lens), "layers": layers, "compiled_temp": temps, "estimate": ests,
            "ratio": grow_c / grow_e if grow_e else float("nan"), "compile_s": secs}


def activation_bytes(config, setup: state_lib.Setup) -> int:
    """``activation_memory(config, setup)["total"]``, or 0 where it does not apply (for the trainer's memory
    check: need = params + optimizer state + gradients + this)."""
    act = activation_memory(config, setup)
    return 0 if act is None else int(act["total"])
