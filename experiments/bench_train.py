"""Times the trainer's compiled train step and reports tokens/s and MFU as one JSON line.

  python -m experiments.bench_train                                      # lm_tiny, batch 16, seq 128
  python -m experiments.bench_train --config.model.dtype=bfloat16
  python -m experiments.bench_train --config=swa_tiny --config.batch_size=32 --steps=20

The step is built exactly as ``sqattn.train.trainer`` builds it (``make_setup``, ``init_state``,
``make_train_step``, the same shardings and donation); batches come from the config's dataset and are placed
on the devices before timing. ``--warmup`` untimed steps (the first compiles) precede ``--steps`` timed ones,
each synchronised with ``block_until_ready``; the reported step time is their median. The peak is the measured
FLOP/s of a bf16-input, f32-accumulate matmul (``sqattn.train.flops.measured_peak_flops``) summed over the
devices (``system_peak_flops``: CPU devices share the host's cores, so on CPU it is counted once per process),
measured in the same process, so ``mfu = flops_per_token * tokens_per_s / peak_flops_per_s``.

Flags: --config=NAME[:arg] and --config.a.b=value (as experiments/train.py), --warmup, --steps,
--workdir (optional: also writes bench_train.json there).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from absl import app, flags

DEFAULT_CONFIG = "lm_tiny"
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQ_LEN = 128


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one compiles).")
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_string("workdir", None, "If set, also write the JSON record to <workdir>/bench_train.json.")


FLAGS = flags.FLAGS

_CONFIG_ARGV: list[str] = []


def bench_config(config_argv: list[str]):
    """The benchmark's config: the named one (default lm_tiny) at batch 16, seq 128, then the overrides."""
    from sqattn import configs
    from sqattn.configs import cli
    name, overrides, _ = cli.split_argv(config_argv)
    config = configs.get(name or DEFAULT_CONFIG)
    config.batch_size = DEFAULT_BATCH_SIZE
    if "seq_len" in config.data:
        config.data.seq_len = DEFAULT_SEQ_LEN
    cli.apply_overrides(config, overrides)
    config.lock()
    return config


def run_benchmark(config, *, warmup: int = 3, steps: int = 10) -> dict:
    """Times ``steps`` train steps after ``warmup`` ones; returns the JSON-able record."""
    import flax
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sqattn.configs.validate import validate
    from sqattn.parallel import sharding
    from sqattn.train import flops as flops_lib
    from sqattn.train import state as state_lib
    from sqattn.train import tasks as tasks_lib
    from sqattn.train import trainer

    if steps < 1 or warmup < 1:
        raise ValueError(f"need --warmup >= 1 (compilation) and --steps >= 1, got {warmup}, {steps}")
    validate(config)
    setup = state_lib.make_setup(config)
    task = tasks_lib.get_task(config.task)
    train_ds, _ = task.make_datasets(config)

    def to_global(np_batch):
        return {k: jax.make_array_from_process_local_data(
            NamedSharding(setup.mesh, P(("data", "fsdp"), *([None] * (v.ndim - 1)))), v)
            for k, v in np_batch.items()}

    batches = [to_global(train_ds.batch(i)) for i in range(warmup + steps)]
    state = state_lib.init_state(config, setup)
    with sharding.activation_sharding(setup.mesh, setup.rules):
        train_step = jax.jit(
            trainer.make_train_step(setup.graphdef, task, setup.tx, setup.schedule, config.optim.grad_accum,
                                    config.seed),
            in_shardings=(setup.state_shardings, None), out_shardings=(setup.state_shardings, None),
            donate_argnums=(0,))
        times = []
        metrics = None
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            state, metrics = train_step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    step_time = statistics.median(timed)

    seq_len = int(getattr(train_ds, "seq_len", 1))
    tokens_per_step = config.batch_size * seq_len
    model_view = nnx.merge(setup.graphdef, setup.abstract_params)
    fpt = state_lib.flops_per_token(model_view, setup.abstract_params, seq_len)
    peak_device = flops_lib.measured_peak_flops()
    peak = flops_lib.system_peak_flops()
    tokens_per_s = tokens_per_step / step_time
    loss = float(np.asarray(metrics["loss"]))
    return {
        "config": config.name,
        "batch_size": int(config.batch_size),
        "seq_len": seq_len,
        "dtype": str(config.model.get("dtype", "")),
        "params": state_lib.param_count(setup.abstract_params),
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "warmup": warmup,
        "steps": steps,
        "compile_and_first_step_s": times[0],
        "step_time_s": step_time,
        "step_time_min_s": min(timed),
        "step_time_max_s": max(timed),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": fpt,
        "model_flops_per_s": fpt * tokens_per_s,
        "peak_flops_per_s": peak,
        "peak_flops_per_s_per_device": peak_device,
        "mfu": fpt * tokens_per_s / peak,
        "final_loss": loss,
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from sqattn.configs import cli
    from sqattn.configs.validate import ConfigError
    try:
        config = bench_config(_CONFIG_ARGV)
        record = run_benchmark(config, warmup=FLAGS.warmup, steps=FLAGS.steps)
    except (ConfigError, ValueError, TypeError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
    record["overrides"] = dict(cli.split_argv(_CONFIG_ARGV)[1])
    line = json.dumps(record, sort_keys=True)
    if FLAGS.workdir:
        os.makedirs(FLAGS.workdir, exist_ok=True)
        with open(os.path.join(FLAGS.workdir, "bench_train.json"), "w") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    define_flags()
    from sqattn.configs import cli
    app.run(main, flags_parser=cli.absl_flags_parser(_CONFIG_ARGV))
