"""Long-tailed document packs for CAD experiments and tests (the length law of papers/cad.md).

Length law (matches the WLB-LLM sample statistics quoted in cad.md): with probability ``1 - tail_frac`` a
lognormal with median ``median`` and shape ``sigma``, else a Pareto(``tail_alpha``) with minimum ``tail_min``;
clipped to ``[lo, hi]``. ``scale`` multiplies every length parameter (scaled-down packs for CPU runs).
Documents are packed sequentially into ``D`` micro-batches of ``T`` tokens; a document crossing a micro-batch
edge is split there and each piece keeps its absolute positions.
"""

from __future__ import annotations

import numpy as np

from sqattn.parallel.cad.planner import Pieces


def sample_doc_lengths(rng: np.random.Generator, total_tokens: int, *, scale: float = 1.0,
                       median: float = 3000.0, sigma: float = 0.8, tail_frac: float = 0.02,
                       tail_alpha: float = 1.2, tail_min: float = 10000.0, lo: int = 64,
                       hi: int = 131072) -> np.ndarray:
    """Document lengths (int64) summing exactly to ``total_tokens`` (the last one is cut).

    Args:
      rng: numpy generator (the only source of randomness).
      total_tokens: tokens to fill.
      scale: multiplies ``median``, ``tail_min``, ``lo`` and ``hi``.
      median, sigma: lognormal body.  tail_frac, tail_alpha, tail_min: Pareto tail.  lo, hi: clip bounds.
    """
    lo_s, hi_s = max(1, int(round(lo * scale))), max(1, int(round(hi * scale)))
    out: list[np.ndarray] = []
    filled = 0
    while filled < total_tokens:
        n = max(64, int(2 * (total_tokens - filled) / (median * scale)) + 16)
        body = rng.lognormal(np.log(median * scale), sigma, n)
        tail = (rng.pareto(tail_alpha, n) + 1.0) * tail_min * scale
        s = np.where(rng.random(n) < tail_frac, tail, body)
        s = np.clip(np.round(s), lo_s, hi_s).astype(np.int64)
        out.append(s)
        filled += int(s.sum())
    s = np.concatenate(out)
    cum = np.cumsum(s)
    k = int(np.searchsorted(cum, total_tokens))          # first doc reaching the total
    s = s[:k + 1].copy()
    s[-1] -= int(cum[k] - total_tokens)
    return s


def pack_pieces(lengths: np.ndarray, num_devices: int, tokens_per_device: int) -> Pieces:
    """Packs documents (ids ``0..n-1``) sequentially into ``num_devices`` micro-batches of ``tokens_per_device``.

    Returns the pieces (doc, device, [a, b) positions within the doc); a document crossing a micro-batch edge
    yields one piece per device it touches.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.sum() != num_devices * tokens_per_device:
        raise ValueError(f"lengths sum to {lengths.sum()}, not {num_devices} x {tokens_per_device}")
    start = np.cumsum(lengths) - lengths                  # global offset of each doc
    edges = np.arange(1, num_devices) * tokens_per_device
    cuts = np.unique(np.concatenate([start, edges, [lengths.sum()]]))
    lo, hi = cuts[:-1], cuts[1:]                          # global token runs with no doc start / edge inside
    doc = np.searchsorted(start, lo, side="right") - 1
    dev = lo // tokens_per_device
    a = lo - start[doc]
    return Pieces(doc.astype(np.int64), dev.astype(np.int64), a, a + (hi - lo))


def pack_tokens(lengths: np.ndarray, num_devices: int, tokens_per_device: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (doc id, position within doc) arrays, each [num_devices, tokens_per_device] int32."""
    lengths = np.asarray(lengths, np.int64)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    shape = (num_devices, tokens_per_device)
    return doc.reshape(shape).astype(np.int32), pos.reshape(shape).astype(np.int32)


def packed_lm_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int, *,
                    scale: float = 1.0 / 64) -> dict[str, np.ndarray]:
    """An LM batch of packed documents: ``inputs``, ``targets``, ``weights``, ``segment_ids`` [batch, seq_len].

    Each row packs documents from the length law (cut at the row end). A document is an arithmetic sequence
    ``(start + stride * t) mod vocab_size`` with a random start and stride in ``[1, 7]``, so a model can learn
    it from context; the loss ignores each document's last token (its target would be the next document).
    """
    rows = {k: [] for k in ("inputs", "targets", "weights", "segment_ids")}
    for _ in range(batch):
        lengths = sample_doc_lengths(rng, seq_len, scale=scale, hi=max(seq_len, 1) * 64)
        seg = np.repeat(np.arange(len(lengths)), lengths)
        t = np.arange(seq_len) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        start = rng.integers(0, vocab_size, len(lengths))[seg]
        stride = rng.integers(1, 8, len(lengths))[seg]
        inputs = (start + stride * t) % vocab_size
        targets = (start + stride * (t + 1)) % vocab_size
        weights = np.ones(seq_len, np.float32)
        weights[np.cumsum(lengths) - 1] = 0.0
        for k, v in zip(rows, (inputs, targets, weights, seg)):
            rows[k].append(v)
    out = {k: np.stack(v) for k, v in rows.items()}
    out["inputs"] = out["inputs"].astype(np.int32)
    out["targets"] = out["targets"].astype(np.int32)
    out["segment_ids"] = out["segment_ids"].astype(np.int32)
    return out
