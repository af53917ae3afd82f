"""Train any registered config.

  python -m experiments.train                                  # default: sse_h_tiny (SSE-H byte LM, local text)
  python -m experiments.train --config=lm_tiny --config.num_steps=100 --workdir=/tmp/run
  python -m experiments.train --config=lm_tiny --dry_run        # sizes, memory, FLOPs; allocates nothing
  python -m experiments.train --config=sse_h_2b --dry_run --dry_run_target=tpu   # activations as on a TPU

Flags: --config=NAME[:arg] (see sqattn/configs/__init__.py REGISTRY), --config.a.b=value overrides,
--workdir (default /tmp/sqattn/<config>), --dry_run, --distributed (call jax.distributed.initialize()).
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags

DEFAULT_CONFIG = "sse_h_tiny"  # the flagship: SSE-H, 3 SSE layers + 1 attention, byte LM on local text


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics.jsonl, tb/, loss.png).")
    flags.DEFINE_bool("dry_run", False, "Build the model abstractly, print sizes/memory/FLOPs as a table and a "
                      "final JSON line, and exit without allocating it.")
    flags.DEFINE_enum("dry_run_target", None, ["cpu", "gpu", "tpu"], "With --dry_run: estimate activations for "
                      "this platform's mixer implementations (default: this host's).")
    flags.DEFINE_string("compilation_cache", None, "Persistent compilation cache directory (default "
                        "$SQATTN_COMPILATION_CACHE or ~/.cache/sqattn/jax); empty turns it off.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changes what the run "
                      "computes (data, optimizer, batch, steps, seed); the changes are recorded in metrics.jsonl. "
                      "Model changes are never resumed.")


FLAGS = flags.FLAGS

_CONFIG_ARGV: list[str] = []


def _quiet_logging() -> None:
    """sqattn's own INFO lines on stderr; absl/orbax chatter only from WARNING up."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger("sqattn")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[sqattn] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _StartupSignal(BaseException):
    pass


def _startup_signal(signum, frame):
    raise _StartupSignal(signum)


def main(argv):
    del argv
    import signal
    # From the first line on, SIGTERM/SIGINT end the process with one line; the trainer takes them over
    # (saving a checkpoint in its loop) once it starts.
    signal.signal(signal.SIGTERM, _startup_signal)
    signal.signal(signal.SIGINT, _startup_signal)
    try:
        _main()
    except _StartupSignal as e:     # exit 0 like a SIGTERM in the loop: the workdir is consistent
        print(f"stopped by {signal.Signals(e.args[0]).name} during start-up; nothing was written",
              file=sys.stderr)


def _main():
    if FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    from sqattn.configs import cli
    from sqattn.configs.validate import ConfigError
    from sqattn.train.trainer import enable_compilation_cache
    enable_compilation_cache(FLAGS.compilation_cache)
    try:
        config, _ = cli.config_from_argv(_CONFIG_ARGV, DEFAULT_CONFIG)
    except (ValueError, TypeError) as e:
        sys.exit(f"error: {e}")
    if FLAGS.dry_run:
        from sqattn.train.dryrun import dry_run, format_report
        try:
            print(format_report(dry_run(config, check_devices=False, target=FLAGS.dry_run_target)))
        except ConfigError as e:
            sys.exit(f"error: invalid config: {e}")
        return
    if FLAGS.workdir is not None and not FLAGS.workdir.strip():
        sys.exit("error: --workdir is empty; pass --workdir=DIR or leave the flag out for the default "
                 "/tmp/sqattn/<config>")
    from sqattn.train import train_and_evaluate
    from sqattn.train.checkpoint import CheckpointError
    from sqattn.train.metrics import MetricsFileError
    from sqattn.train.trainer import MemoryBudgetError, NonFiniteLossError, Preempted
    from sqattn.train.workdir import ConfigChangeError, WorkdirBusyError
    workdir = FLAGS.workdir or os.path.join("/tmp/sqattn", config.name.replace(":", "_"))
    _quiet_logging()
    try:
        result = train_and_evaluate(config, workdir, progress=FLAGS.progress,
                                    allow_config_change=FLAGS.allow_config_change)
    except Preempted as e:
        what = ("the final checkpoint is saved; run again to evaluate it" if e.phase == "final eval"
                else "no checkpoint was written in this phase; the workdir is as it was")
        print(f"stopped by {signal_name(e.signum)} during {e.phase}: {what}", file=sys.stderr)
        return
    except (ConfigError, ConfigChangeError, WorkdirBusyError, MemoryBudgetError, NonFiniteLossError,
            CheckpointError, MetricsFileError, ValueError, OSError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
    print(f"checkpoints: {result['checkpoints']}\nmetrics:     {result['metrics']}\n"
          f"tensorboard: {os.path.join(workdir, 'tb')}\nplot:        {result['plot']}")
    if result["stopped_early"]:
        print(f"stopped early at step {result['step']} (checkpoint saved); run the same command to resume")
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, bool))}))


def signal_name(signum: int) -> str:
    import signal
    return signal.Signals(signum).name


if __name__ == "__main__":
    define_flags()
    from sqattn.configs import cli
    app.run(main, flags_parser=cli.absl_flags_parser(_CONFIG_ARGV))
