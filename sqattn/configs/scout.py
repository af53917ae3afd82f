"""SCOUT hybrids (papers/scout.md): SCOUT-SWA ("AC") and SCOUT-Mamba ("MC") byte-level LMs, plus the
baselines the reproduction compares them with, all of one depth and width.

Commands:
  python -m experiments.train --config=scout_swa_tiny --workdir=/tmp/scout_swa_tiny
  python -m experiments.train --config=scout_mamba_400m --dry_run          # parameters / memory / FLOPs
  python -m experiments.scout --workdir=/tmp/scout                        # the reproduction (both parts)
Args: ``mixer=swa|mamba|full|swa_only|mamba_only``, ``size=tiny|400m``, ``runlocal`` (a few steps of a
one-SCOUT-layer model, for smoke tests).

Mixers (every block is ``x + mixer(norm(x))`` then ``x + SwiGLU(norm(x))``, so one paper "SCOUT layer" =
two pattern letters and ``num_layers = 2 * SCOUT layers``):

* ``swa``: SCOUT-SWA, ``block_pattern="AC"``: sliding-window attention (``attention.window = W``), then
  checkpoint attention (``scout.segment_len = L``).
* ``mamba``: SCOUT-Mamba, ``block_pattern="MC"``: Mamba-1 (S6), then checkpoint attention.
* baselines with the same depth, width and MLPs: ``full`` ("AA", causal full attention), ``swa_only``
  ("AA" with window W), ``mamba_only`` ("MM"). ``AC`` and ``AA`` have exactly the same parameters;
  ``MM`` has more than ``MC`` (a Mamba mixer is ~6 d^2 against 4 d^2 for attention).

Sizes:

* ``tiny`` (ours, for 2 CPU cores): d 128, 4 pattern letters (2 SCOUT layers), 4 heads of 32 (no GQA),
  SwiGLU 384, L 16, W 64, T 256, vocabulary 256 (bytes of the local text corpus), tied embeddings, RoPE
  theta 1e4, bf16 compute, Mamba d_state 16 / expand 2 / conv 4 / dt_rank auto (8) / chunk 8.
* ``400m``: the paper's SCOUT-Mamba-430M / SCOUT-SWA-470M shapes (scout.md table): d 1024, 14 (mamba) /
  17 (swa) SCOUT layers -> num_layers 28 / 34, 16 heads (d/64, no GQA), SwiGLU 2816, L 10, W 1024, vocabulary
  32000, tied, RoPE theta 1e6, Mamba d_state 16 / expand 2 / conv 4 / dt_rank 128, T 2048, bf16, AdamW
  (0.9, 0.95) wd 0.1 clip 1.0 lr 3e-4 cosine to lr/10 — all from the paper/its code. Ours: the data source
  (local bytes here; the paper used FineWeb-Edu with the Llama tokenizer, i.e. ``data=tfds`` with a prepared
  32000-token dataset), batch 16, steps, warmup 1000, Mamba chunk 64. Meant for ``--dry_run`` on CPU.

Hardware / runtime / result: see ``experiments/scout.py`` (its docstring records the measured table).
"""

from __future__ import annotations

import ml_collections

from sqattn import data
from sqattn.configs import base, parse_arg

# size -> (d_model, scout layers (swa, mamba), heads, mlp_dim, segment_len L, window W, seq_len T, vocab)
SIZES = {
    "tiny": (128, (2, 2), 4, 384, 16, 64, 256, 256),
    "400m": (1024, (17, 14), 16, 2816, 10, 1024, 2048, 32000),
}

# mixer arg -> two-letter block pattern
PATTERNS = {"swa": "AC", "mamba": "MC", "full": "AA", "swa_only": "AA", "mamba_only": "MM"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, mixer="swa", size="tiny", runlocal=False)
    if a.size not in SIZES:
        raise ValueError(f"scout configs: unknown size {a.size!r}; known: {sorted(SIZES)}")
    if a.mixer not in PATTERNS:
        raise ValueError(f"scout configs: unknown mixer {a.mixer!r}; known: {sorted(PATTERNS)}")
    d, (layers_swa, layers_mamba), heads, mlp, seg_len, window, seq_len, vocab = SIZES[a.size]
    big = a.size != "tiny"
    layers = layers_mamba if a.mixer in ("mamba", "mamba_only") else layers_swa

    c = base.base_config()
    c.data = data.default_config("text")
    c.data.seq_len = seq_len
    c.batch_size = 16
    c.num_steps = 100_000 if big else 400
    c.eval_every = 5000 if big else 200
    c.eval_batches = 8
    c.optim.lr = 3e-4 if big else 3e-3
    c.optim.warmup_steps = 1000 if big else 40
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=vocab,
        d_model=d,
        num_layers=2 * layers,           # one SCOUT layer = local mixer block + checkpoint-attention block
        block_pattern=PATTERNS[a.mixer],
        mlp_dim=mlp,                     # SwiGLU hidden after every mixer (two per SCOUT layer)
        tie_embeddings=True,
        dtype="bfloat16",
        norm_eps=1e-6,
        remat=big,
        mixers=ml_collections.ConfigDict(dict(
            attention=ml_collections.ConfigDict(dict(
                num_heads=heads, num_kv_heads=heads, window=0 if a.mixer == "full" else window,
                rope_theta=1e6 if big else 1e4, qk_norm=False, cad=False)),
            scout=ml_collections.ConfigDict(dict(
                num_heads=heads, num_kv_heads=heads, segment_len=seg_len,
                rope_theta=1e6 if big else 1e4, impl="auto")),   # impl: auto | ref | pallas | interpret
            mamba=ml_collections.ConfigDict(dict(
                d_state=16, expand=2, d_conv=4, dt_rank=128 if big else "auto",
                chunk_size=64 if big else 8, impl="auto")),
        )),
    ))
    if a.runlocal:
        base.runlocal(c)
        c.model.update(d_model=64, num_layers=2, mlp_dim=128)
        c.model.mixers.attention.update(num_heads=2, num_kv_heads=2, window=0 if a.mixer == "full" else 16)
        c.model.mixers.scout.update(num_heads=2, num_kv_heads=2, segment_len=8)
        c.model.vocab_size = 256
    return c
