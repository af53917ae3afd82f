"""Byte-level decoder LMs on local text with one mixer type: softmax attention (full or sliding window) or GLA.

Command (the main job before sse_h_tiny became the default; 2 CPU cores, 600 steps of 2048 bytes, ~3 min alone on 2 cores; measured: train
loss 4.05 nats at step 10 -> 1.24 at step 600, eval 1.83 bits/byte):
  python -m experiments.train --config=lm_tiny --workdir=/tmp/lm_tiny
Args: ``mixer=attention|swa|gla|mamba|mamba2``, ``size=tiny|small``, ``data=text|tfds``, ``runlocal`` (a few
steps, for smoke tests). A prepared TFDS text dataset instead of local text:
  python -m experiments.train --config=lm_tiny:data=tfds --config.data.tfds_name=lm1b \
      --config.data.tfds_data_dir=/data/tfds
"""

from __future__ import annotations

import ml_collections

from sqattn.configs import base, parse_arg

# size -> (d_model, num_layers, num_heads, num_kv_heads, mlp_dim)
SIZES = {
    "tiny": (128, 4, 4, 2, 384),
    "small": (384, 6, 6, 2, 1024),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, mixer="attention", size="tiny", data="text", runlocal=False)
    if a.size not in SIZES:
        raise ValueError(f"unknown size {a.size!r}; known: {sorted(SIZES)}")
    d, layers, heads, kv_heads, mlp = SIZES[a.size]
    c = base.base_config()
    if a.data not in ("text", "tfds"):
        raise ValueError(f"lm configs: data must be text|tfds, got {a.data!r}")
    base.tiny_byte_lm(c, a.data)
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=256,            # bytes
        d_model=d,
        num_layers=layers,
        block_pattern="A",         # mixer letters, repeated to num_layers (sqattn.mixers)
        mlp_dim=mlp,               # SwiGLU hidden; 0 = no MLP
        tie_embeddings=True,
        dtype="bfloat16",          # compute dtype ("float32" | "bfloat16"); params stay float32
        norm_eps=1e-6,
        remat=False,               # rematerialise each block in the backward pass
        scan_layers=False,         # identical blocks through one lax.scan (sqattn.models.lm.scan_blocks)
        mixers=ml_collections.ConfigDict(dict(
            attention=ml_collections.ConfigDict(dict(
                num_heads=heads, num_kv_heads=kv_heads, window=0, rope_theta=10000.0, qk_norm=False,
                cad=False)),               # core-attention disaggregation (sqattn.parallel.cad)
        )),
    ))
    if a.mixer == "swa":
        c.model.mixers.attention.window = 32
    elif a.mixer == "gla":
        c.model.block_pattern = "G"
        c.model.mixers.gla = ml_collections.ConfigDict(dict(
            num_heads=heads, key_map="softmax", query_map="silu", gate_rank=16, gate_norm=16.0,
            short_conv=False, chunk_size=64, impl="auto"))
    elif a.mixer in ("mamba", "mamba2"):
        # Mamba-style blocks: no MLP and twice the layers of the Transformer of the same size
        # (papers/mamba_free_lunch.md §3.1). mamba_tiny: 8 x d128 S6 (N=16); mamba2_tiny: 8 x d128 SSD
        # (N=64, 4 heads of 64).
        c.model.update(num_layers=2 * layers, mlp_dim=0)
        if a.mixer == "mamba":
            c.model.block_pattern = "M"
            # chunk 8: the chunked S6 scan's fwd+bwd on 2 CPU cores took 1.1 / 1.7 / 2.6 / 2.9 s at
            # chunk 8 / 16 / 32 / 64 (b=16, T=128, D_in=256, N=16).
            c.model.mixers.mamba = ml_collections.ConfigDict(dict(
                d_state=16, expand=2, d_conv=4, dt_rank="auto", chunk_size=8, impl="auto"))
        else:
            c.model.block_pattern = "2"
            c.model.mixers.mamba2 = ml_collections.ConfigDict(dict(
                d_state=64, expand=2, head_dim=64, ngroups=1, d_conv=4, chunk_size=64, impl="auto"))
    elif a.mixer != "attention":
        raise ValueError(f"lm configs: unknown mixer {a.mixer!r}; expected attention|swa|gla|mamba|mamba2")
    if a.runlocal:
        base.runlocal(c)
        c.model.update(d_model=64, num_layers=2, mlp_dim=128)
        if a.mixer in ("mamba", "mamba2"):
            c.model.mlp_dim = 0
    return c


def small_lm(*, steps: int, d_model: int = 64, layers: int = 4, seq_len: int = 128,
             batch_size: int = 16, seed: int = 0) -> ml_collections.ConfigDict:
    """The small base LM of the reproductions that start from a trained LM (hamburger.md, liger.md: d 64, 4
    blocks, bytes of Python at T 128, batch 16; 500 steps train in ~80 s on two quiet cores):
    ``lm_tiny`` at width ``d_model`` (heads of 16, kv heads of 32, SwiGLU 3·d) and depth ``layers``,
    trained ``steps`` steps on rows of ``seq_len`` bytes; one checkpoint at the end, no periodic eval."""
    if d_model < 16 or d_model % 16:
        raise ValueError(f"d_model must be a positive multiple of 16 (heads of 16), got {d_model}")
    if steps < 1 or layers < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need steps, layers, batch_size >= 1 and seq_len >= 2; got steps={steps}, "
                         f"layers={layers}, seq_len={seq_len}, batch_size={batch_size}")
    cfg = get_config("mixer=attention")
    cfg.name = "lm_tiny"
    cfg.num_steps = steps
    cfg.seed = seed
    cfg.batch_size = batch_size
    cfg.data.seq_len = seq_len
    cfg.model.d_model = d_model
    cfg.model.num_layers = layers
    cfg.model.mlp_dim = 3 * d_model
    cfg.model.mixers.attention.num_heads = d_model // 16
    cfg.model.mixers.attention.num_kv_heads = max(1, d_model // 32)
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(steps // 10, 1))
    cfg.eval_every = 0
    cfg.eval_batches = 4
    cfg.log_every = max(1, min(10, steps))
    cfg.checkpoint_every = steps
    cfg.mesh.fsdp = 1                      # one device: the model is tiny
    return cfg
