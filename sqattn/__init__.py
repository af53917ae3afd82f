"""sqattn: sub-quadratic sequence mixers, sparse experts, growth/adaptation methods and their tools, in JAX.

Import map (see ../WORKSPACE.md):
  sqattn.configs   named configs (`configs.get("sse_h_tiny")`)
  sqattn.models    models (decoder LM with a block pattern, ...)
  sqattn.mixers    sequence mixers with a common interface (parallel call, init_cache, step)
  sqattn.layers    shared blocks (Dense, Embed, RMSNorm, RoPE, SwiGLU)
  sqattn.data      deterministic datasets (local text, tfds, synthetic tasks)
  sqattn.train     the generic trainer: `train_and_evaluate(config, workdir)`
  sqattn.parallel  mesh + logical-axis rules
"""

__version__ = "0.1.0"
