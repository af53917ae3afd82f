"""Shared tile, padding, compiler-parameter and on-chip-footprint helpers of the Pallas kernels.

**Footprint.** Each kernel wrapper describes its blocks to ``check_footprint`` while it builds its
``pallas_call``; the figure is what one program holds on chip:

* TPU (Mosaic): every BlockSpec'd operand is a VMEM window, double-buffered by the pipeline (``2 x`` its block
  bytes, padded to the (8, 128) tile of its dtype), plus VMEM scratch, plus the kernel's largest in-loop
  temporaries (declared by the kernel). It is checked against the VMEM of each TPU target (v5e 128 MiB, v5p
  64 MiB per TensorCore), and ``vmem_limit_bytes`` is set from it (Mosaic's default scoped limit is 16-32 MiB).
* GPU (Triton): BlockSpecs are pointers, nothing is staged per block; what sits on chip are the tiles the body
  loads and multiplies. The kernel declares its per-iteration ``tl.dot`` operand tiles (staged in shared memory,
  ``num_stages`` deep by the software pipeliner) and its loop-carried accumulators (registers). Shared memory is
  checked against an H100/H200 SM (227 KiB per block, a hard limit); live tiles beyond one program's registers
  (255 per thread, 4 warps: ~130 KiB) are reported as ``spills`` (Triton spills to local memory: slower, legal).

These are models of the compilers, not measurements: they catch tiles that cannot fit (whole-sequence blocks at
T = 4096, a [64, 2048] f32 accumulator per program), not a few KiB of compiler scratch.

``record()`` collects every check made while tracing (tests and ``experiments/accelerator_check.py`` read it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp

MIN_TILE = 16  # smallest Triton tl.dot dimension
LANES, SUBLANES = 128, 8  # TPU vreg tile

# Per-TensorCore VMEM (jax.experimental.pallas TPU info) and per-block shared memory / per-SM registers.
TPU_VMEM = {"v5e": 128 * 2**20, "v5p": 64 * 2**20}
GPU_SMEM = {"h100": 227 * 2**10, "h200": 227 * 2**10}
GPU_WARPS = 4  # num_warps passed to Triton
GPU_PROGRAM_REGS = 255 * 32 * GPU_WARPS * 4  # bytes of registers one program can hold before spilling
VMEM_HEADROOM = 4 * 2**20  # added to a kernel's VMEM footprint for Mosaic's internal scratch


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def padded_dim(dim: int) -> int:
    """Kernel size of a head dim: the next power of two, at least 16 (Triton; lane-dense enough for TPU)."""
    return max(next_pow2(dim), MIN_TILE)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def pad_last(x: jax.Array, size: int) -> jax.Array:
    return pad_axis(x, x.ndim - 1, size)


# ---- footprint ------------------------------------------------------------------------------------------------

Block = tuple[Sequence[int], object]  # (block shape without squeezed dims, dtype)


def _tpu_bytes(shape: Sequence[int], dtype) -> int:
    """VMEM bytes of one block: last two dims padded to the dtype's (sublanes * packing, 128) tile."""
    itemsize = jnp.dtype(dtype).itemsize
    shape = [int(s) for s in shape] or [1]
    if len(shape) == 1:
        shape = [1] + shape
    packing = max(4 // itemsize, 1)
    rows = round_up(shape[-2], SUBLANES * packing)
    cols = round_up(shape[-1], LANES)
    return math.prod(shape[:-2]) * rows * cols * itemsize


def _bytes(shape: Sequence[int], dtype) -> int:
    return math.prod(int(s) for s in shape) * jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Footprint:
    """On-chip bytes of one program of ``kernel`` on ``platform`` and the limits it was checked against."""
    kernel: str
    platform: str
    bytes: int              # VMEM (TPU) or shared memory (GPU)
    limit: int              # smallest capacity of the targets
    targets: tuple[str, ...]
    register_bytes: int = 0  # GPU: loop-carried accumulators + live tiles
    vmem_limit_bytes: int | None = None  # TPU: what the kernel passes to Mosaic

    @property
    def fits(self) -> bool:
        return self.bytes <= self.limit

    @property
    def spills(self) -> bool:
        """GPU: the live tiles exceed one program's registers (255 per thread x 32 x ``GPU_WARPS`` warps); Triton
        then spills to local memory: slower, not an error."""
        return self.platform == "gpu" and self.register_bytes > GPU_PROGRAM_REGS

    def reason(self) -> str | None:
        """Why the program does not fit, or None."""
        if self.bytes > self.limit:
            what = "VMEM" if self.platform == "tpu" else "shared memory"
            return (f"{self.kernel} needs {self.bytes / 2**20:.2f} MiB of {what} per program, more than the "
                    f"{self.limit / 2**20:.2f} MiB of {'/'.join(self.targets)}")
        return None


_RECORD = threading.local()


@contextlib.contextmanager
def record():
    """Collects every ``Footprint`` computed while the block runs (a list, filled during tracing)."""
    prev = getattr(_RECORD, "items", None)
    items: list[Footprint] = []
    _RECORD.items = items
    try:
        yield items
    finally:
        _RECORD.items = prev


def tpu_footprint(kernel: str, blocks: Sequence[Block], *, scratch: Sequence[Block] = (),
                  temporaries: Sequence[Block] = (), buffers: int = 2) -> Footprint:
    """VMEM of one Mosaic program: ``buffers`` x pipelined blocks + scratch + declared temporaries."""
    total = buffers * sum(_tpu_bytes(s, d) for s, d in blocks)
    total += sum(_tpu_bytes(s, d) for s, d in scratch) + sum(_tpu_bytes(s, d) for s, d in temporaries)
    limit = min(TPU_VMEM.values())
    vmem_limit = min(round_up(total + VMEM_HEADROOM, 2**20), limit)
    fp = Footprint(kernel, "tpu", total, limit, tuple(TPU_VMEM), vmem_limit_bytes=max(vmem_limit, 32 * 2**20))
    return _note(fp)


def gpu_footprint(kernel: str, dot_tiles: Sequence[Block], *, live: Sequence[Block] = (),
                  num_stages: int = 2) -> Footprint:
    """Shared memory of one Triton program: ``num_stages`` x the per-iteration dot operand tiles; registers:
    the loop-carried and live tiles (``live``)."""
    smem = num_stages * sum(_bytes(s, d) for s, d in dot_tiles)
    regs = sum(_bytes(s, d) for s, d in live)
    return _note(Footprint(kernel, "gpu", smem, min(GPU_SMEM.values()), tuple(GPU_SMEM), register_bytes=regs))


def _note(fp: Footprint) -> Footprint:
    items = getattr(_RECORD, "items", None)
    if items is not None:
        items.append(fp)
    return fp


def require_fit(fp: Footprint) -> None:
    """Raises ``ValueError`` (with the figures) when ``fp`` does not fit its targets."""
    reason = fp.reason()
    if reason:
        raise ValueError(f"{reason}; use smaller tiles or impl='chunked'")


# ---- compiler parameters ----------------------------------------------------------------------------------------


def compiler_params(platform: str, interpret: bool, *, footprint: Footprint | None = None,
                    dimension_semantics: Sequence[str] | None = None, num_warps: int = GPU_WARPS,
                    num_stages: int = 2):
    """Compiler parameters for the compiled kernel: ``None`` when interpreting.

    GPU: Triton parameters, passed explicitly (they select the Triton lowering the kernels are written for;
    without them ``pallas_call`` on GPU takes Mosaic GPU, which rejects these kernels). TPU: Mosaic parameters
    with the grid's dimension semantics and ``vmem_limit_bytes`` from the footprint.
    """
    if interpret or platform not in ("gpu", "tpu"):
        return None
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton  # GPU-only import
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(
        dimension_semantics=None if dimension_semantics is None else tuple(dimension_semantics),
        vmem_limit_bytes=None if footprint is None else footprint.vmem_limit_bytes)
