"""Sample text from a trained byte-level LM.

  python -m experiments.train --config=lm_tiny --workdir=/tmp/lm_tiny
  python -m experiments.sample --workdir=/tmp/lm_tiny --prompt="def " --max_new_tokens=200 \
      --temperature=0.8 --top_k=40 --seed=0

Prints the prompt followed by its continuation. Restores the latest checkpoint (or --step) onto one device.
--temperature=0 decodes greedily.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags


def define_flags() -> None:
    """Defines this binary's flags (only when run as a program, so binaries can be imported together)."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json and checkpoints/).", required=True)
    flags.DEFINE_string("prompt", "def ", "Text to continue (UTF-8; tokens are its bytes).")
    flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
    flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
    flags.DEFINE_integer("top_k", 40, "Sample among the k most likely bytes (0 = all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("step", None, "Checkpoint step to restore (default: the latest).")


FLAGS = flags.FLAGS


def main(argv):
    del argv
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    from sqattn import sample
    from sqattn.train.checkpoint import CheckpointError
    try:
        model, config = sample.load_model(FLAGS.workdir, FLAGS.step)
        if not sample.is_byte_level(config):
            sys.exit(f"error: the run in {FLAGS.workdir!r} is not byte-level (data {config.data.name!r}, "
                     f"vocab {config.model.get('vocab_size')}); text prompts do not apply")
        text = sample.complete(model, FLAGS.prompt, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                               top_k=FLAGS.top_k, seed=FLAGS.seed)
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        # Leave without interpreter teardown: after a failed restore, orbax/tensorstore's background
        # callbacks still target the closed event loop and would print tracebacks under the one-line error.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    if hasattr(sys.stdout, "reconfigure"):   # sampled bytes may not fit a non-UTF-8 terminal encoding
        sys.stdout.reconfigure(errors="replace")
    print(FLAGS.prompt + text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
