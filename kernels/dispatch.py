"""One place that decides which implementation of an op runs, for which target, under which mesh.

Every public op takes ``impl`` with one of:

* ``"auto"``     compiled Pallas where a kernel exists for the target (GPU/TPU) and can take the shape;
                 otherwise the XLA chunked/reference path (logged once, with the reason).
* ``"ref"``      the pure-jnp reference (recurrent ``lax.scan`` or exact parallel form).
* ``"chunked"``  the pure-jnp chunked form (what ``auto`` uses on CPU for linear mixers).
* ``"pallas"``   the compiled Pallas kernel (GPU/TPU only); a shape the kernel cannot take is an error.
* ``"interpret"`` the Pallas kernel run by the Pallas interpreter: what CPU tests use.

**The target** is the platform the program is compiled for, never the host's default backend when something
more specific is known. ``target_platform`` resolves, in order:

1. an explicit ``target=`` argument of the op;
2. the innermost ``lowering_target(platform)`` context (export / AOT from another host);
3. the mesh of the innermost ``kernel_context`` (``sqattn.parallel.sharding.activation_sharding`` enters one
   with the trainer's mesh): its devices' platform;
4. jax's abstract-mesh context device (``jax.sharding.use_abstract_mesh`` with an ``AbstractDevice``);
5. ``jax.default_backend()``.

So the trainer's step, traced inside ``activation_sharding(mesh, rules)``, picks kernels for the mesh's
devices, and ``with lowering_target("tpu"): jax.export.export(jax.jit(step), platforms=["tpu"])(...)`` on a CPU
host lowers the program a TPU host would compile.

**Cross-lowering for TPU.** Mosaic's lowering asks for the chip (``pltpu`` reads ``device_kind`` of the
abstract mesh's device, else of the default device; on a CPU host that fails with "Unsupported TPU device
kind: cpu"). ``lowering_target("tpu", device_kind=...)`` therefore also enters
``jax.sharding.use_abstract_mesh`` with a TPU ``AbstractDevice`` (default ``"TPU v5 lite"``, i.e. v5e) whose
axes are those of the context mesh, and ``shard_op`` maps ops over that abstract mesh, so the chip is known
wherever a Mosaic kernel is lowered. Only the Pallas -> Mosaic / Triton IR step runs on the host; Mosaic's and
Triton's own compilers run at compile time on the accelerator and cannot be exercised here.

**Under a mesh** (``shard_op``): a compiled ``pallas_call`` is an opaque custom call; XLA's partitioner can only
feed it whole arrays (Triton) or refuses it outright (Mosaic: "Mosaic kernels cannot be automatically
partitioned. Please wrap the call in a shard_map"). Every op therefore runs its kernel inside ``jax.shard_map``
over the context's batch axes (and head axes where the op has heads), taken from the logical rules
(``act_batch``, ``act_heads``) and used only where they divide the dimension.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import threading
from typing import Any, Callable, Sequence

import jax

IMPLS = ("auto", "ref", "chunked", "pallas", "interpret")
DEFAULT_TPU_KIND = "TPU v5 lite"  # v5e: what lowering_target("tpu") tells Mosaic when the host has no TPU

log = logging.getLogger("kernels")


@dataclasses.dataclass(frozen=True)
class KernelContext:
    """What the ops need to know about the program being built.

    Attributes:
      platform: ``"cpu"``/``"gpu"``/``"tpu"`` override, or ``None`` to infer from the mesh.
      mesh: the ``jax.sharding.Mesh`` (or ``AbstractMesh``) the step is sharded over, or ``None``.
      batch_axes: mesh axes that may shard an op's batch dimension (in order).
      head_axes: mesh axes that may shard an op's head dimension.
      abstract_mesh: the TPU ``AbstractMesh`` entered by ``lowering_target`` for cross-lowering, else None.
    """
    platform: str | None = None
    mesh: Any = None
    batch_axes: tuple[str, ...] = ()
    head_axes: tuple[str, ...] = ()
    abstract_mesh: Any = None


_STATE = threading.local()
# The context is part of jax's tracing/compilation cache key: a function traced outside a context (or for another
# target or mesh) is re-traced inside one, never reused with the other choice of kernels.
_JIT_KEY = jax.make_user_context(None)


def current_context() -> KernelContext:
    """The innermost ``kernel_context`` / ``lowering_target`` (an empty context outside any)."""
    return getattr(_STATE, "ctx", None) or KernelContext()


@contextlib.contextmanager
def _push(ctx: KernelContext):
    prev = getattr(_STATE, "ctx", None)
    _STATE.ctx = ctx
    try:
        with _JIT_KEY(ctx):
            yield ctx
    finally:
        _STATE.ctx = prev


def _axes(spec) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


@contextlib.contextmanager
def kernel_context(mesh=None, *, batch_axes: Sequence[str] | str | None = None,
                   head_axes: Sequence[str] | str | None = None, platform: str | None = None):
    """Publishes the mesh (and optionally a platform) that ops resolve ``impl`` and ``shard_op`` from.

    ``sqattn.parallel.sharding.activation_sharding(mesh, rules)`` enters this with ``rules["act_batch"]``
    and ``rules["act_heads"]``. A ``platform`` set by an enclosing ``lowering_target`` is kept unless this
    call names one.
    """
    outer = current_context()
    ctx = KernelContext(platform=normalize_platform(platform) if platform else outer.platform,
                        mesh=mesh, batch_axes=_axes(batch_axes), head_axes=_axes(head_axes),
                        abstract_mesh=outer.abstract_mesh)
    with _push(ctx):
        yield ctx


@contextlib.contextmanager
def lowering_target(platform: str, *, device_kind: str | None = None, num_cores: int | None = None):
    """Compile for ``platform`` (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``) whatever the host is.

    For ``"tpu"`` on a host without TPUs it also enters ``jax.sharding.use_abstract_mesh`` with a TPU
    ``AbstractDevice`` (``device_kind`` default ``DEFAULT_TPU_KIND``) shaped like the context mesh (one axis of
    size 1 without a mesh), so Mosaic knows the chip it lowers for. Enter it *inside* ``activation_sharding``
    (or ``kernel_context``) when exporting a sharded step, so the abstract mesh matches the real one.
    """
    plat = normalize_platform(platform)
    outer = current_context()
    am = None
    if plat == "tpu" and (device_kind is not None or jax.default_backend() != "tpu"):
        mesh = outer.mesh
        if mesh is not None:
            sizes, names = tuple(mesh.axis_sizes), tuple(mesh.axis_names)
            types = tuple(mesh.axis_types)
        else:
            sizes, names, types = (1,), ("kernel",), None
        device = jax.sharding.AbstractDevice(device_kind=device_kind or DEFAULT_TPU_KIND,
                                             num_cores=num_cores or 1, platform="tpu")
        am = jax.sharding.AbstractMesh(sizes, names, axis_types=types, abstract_device=device)
    ctx = dataclasses.replace(outer, platform=plat, abstract_mesh=am or outer.abstract_mesh)
    with contextlib.ExitStack() as stack:
        if am is not None:
            stack.enter_context(jax.sharding.use_abstract_mesh(am))
        stack.enter_context(_push(ctx))
        yield ctx


def normalize_platform(platform: str) -> str:
    p = str(platform).lower()
    if p in ("cuda", "rocm", "gpu"):
        return "gpu"
    if p in ("cpu", "tpu"):
        return p
    raise ValueError(f"unknown target platform {platform!r}; expected 'cpu', 'gpu' (or 'cuda'/'rocm') or 'tpu'")


def _mesh_platform(mesh) -> str | None:
    if mesh is None:
        return None
    devices = getattr(mesh, "devices", None)
    if devices is not None and getattr(devices, "size", 0):
        return devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return None if device is None else device.platform


def target_platform(target: str | None = None) -> str:
    """Returns ``"cpu"``, ``"gpu"`` or ``"tpu"``: the platform ops compile for (resolution order above)."""
    if target:
        return normalize_platform(target)
    ctx = current_context()
    if ctx.platform:
        return ctx.platform
    plat = _mesh_platform(ctx.mesh)
    if plat is None:
        device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
        plat = None if device is None else device.platform
    return normalize_platform(plat or jax.default_backend())


@functools.lru_cache(maxsize=None)
def _log_choice(op: str, impl: str, resolved: str, platform: str, reason: str | None) -> None:
    if reason:
        log.warning("kernel %s: impl=%s on %s -> %s (%s)", op, impl, platform, resolved, reason)
    else:
        log.info("kernel %s: impl=%s on %s -> %s", op, impl, platform, resolved)


def resolve_impl(impl: str, *, op: str = "op", has_pallas: tuple[str, ...] = ("gpu", "tpu"),
                 cpu_default: str = "chunked", target: str | None = None,
                 unsupported: Callable[[str], str | None] | None = None) -> str:
    """Maps ``impl`` to a concrete implementation name.

    Args:
      impl: requested implementation, one of ``IMPLS``.
      op: op name, for the log line and error messages.
      has_pallas: platforms for which the op has a compiled Pallas kernel.
      cpu_default: what ``auto`` means where no compiled kernel runs (no kernel for the target, or the kernel
        cannot take this shape).
      target: platform to compile for (see ``target_platform``).
      unsupported: ``platform -> reason or None``: why the compiled kernel cannot take this call's shapes on
        ``platform`` (e.g. a chunk that is not a multiple of 16 on GPU). ``auto`` then falls back to
        ``cpu_default`` (logged once per op and reason); ``pallas`` raises ``ValueError`` with the reason.

    Returns:
      One of ``"ref"``, ``"chunked"``, ``"pallas"``, ``"interpret"``.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected one of {IMPLS}")
    platform = target_platform(target)
    resolved, reason = impl, None
    if impl in ("auto", "pallas"):
        if platform not in has_pallas:
            if impl == "pallas":
                raise ValueError(
                    f"{op}: impl='pallas' needs a compiled kernel for {platform!r}; this op has kernels for "
                    f"{has_pallas}. Use impl='interpret' to run the kernel code on CPU, or 'auto'.")
            resolved = cpu_default
        else:
            reason = unsupported(platform) if unsupported is not None else None
            if reason and impl == "pallas":
                raise ValueError(f"{op}: the {platform} kernel cannot take this call: {reason}")
            resolved = cpu_default if reason else "pallas"
    _log_choice(op, impl, resolved, platform, reason)
    return resolved


# ---- ops under a mesh ----------------------------------------------------------------------------------------


def _shard_axes(mesh, candidates: tuple[str, ...], dims: Sequence[int], used: set[str]) -> tuple[str, ...]:
    """Mesh axes from ``candidates`` (size > 1, unused) whose running product divides every dim in ``dims``."""
    chosen, size = [], 1
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    for ax in candidates:
        n = shape.get(ax, 1)
        if ax in used or n == 1:
            continue
        if all(d % (size * n) == 0 for d in dims):
            chosen.append(ax)
            size *= n
    return tuple(chosen)


def shard_op(fn: Callable, args: Sequence[Any], arg_dims: Sequence[tuple[int | None, int | None] | None],
             out_dims: Sequence[tuple[int | None, int | None]], *, heads: bool = True) -> Any:
    """Runs ``fn(*args)`` inside ``jax.shard_map`` over the context mesh's batch (and head) axes.

    Args:
      fn: the op body (kernel + custom_vjp); it sees per-shard arrays.
      args: its positional arguments (arrays or ``None``).
      arg_dims: per argument ``(batch_dim, head_dim)`` (either ``None`` = not split on that axis), or ``None``
        for an argument that is replicated (e.g. weights, ``A``/``D`` of a scan).
      out_dims: one ``(batch_dim, head_dim)`` pair per array leaf of ``fn``'s output, in flattening order
        (``None`` outputs have no leaf).
      heads: also shard head dims over the context's head axes.

    Returns:
      ``fn(*args)``; called directly when there is no context mesh or no axis divides the dims.
    """
    ctx = current_context()
    mesh = ctx.mesh
    if mesh is None or math.prod(mesh.axis_sizes) == 1:
        return fn(*args)
    batch_sizes = [a.shape[d[0]] for a, d in zip(args, arg_dims) if a is not None and d and d[0] is not None]
    head_sizes = [a.shape[d[1]] for a, d in zip(args, arg_dims) if a is not None and d and d[1] is not None]
    used: set[str] = set()
    b_axes = _shard_axes(mesh, ctx.batch_axes, batch_sizes, used) if batch_sizes else ()
    used.update(b_axes)
    h_axes = _shard_axes(mesh, ctx.head_axes, head_sizes, used) if (heads and head_sizes) else ()
    if not b_axes and not h_axes:
        return fn(*args)

    def entry(axes):
        return None if not axes else (axes[0] if len(axes) == 1 else axes)

    def spec(ndim, dims):
        parts = [None] * ndim
        if dims is not None:
            if dims[0] is not None:
                parts[dims[0]] = entry(b_axes)
            if dims[1] is not None:
                parts[dims[1]] = entry(h_axes)
        return jax.sharding.PartitionSpec(*parts)

    live = [i for i, a in enumerate(args) if a is not None]
    in_specs = tuple(spec(args[i].ndim, arg_dims[i]) for i in live)
    leaves, treedef = jax.tree.flatten(jax.eval_shape(fn, *args))
    if len(out_dims) != len(leaves):
        raise ValueError(f"shard_op: {len(out_dims)} out_dims for {len(leaves)} outputs")
    out_specs = treedef.unflatten([spec(len(x.shape), d) for x, d in zip(leaves, out_dims)])

    def body(*live_args):
        full = list(args)
        for i, a in zip(live, live_args):
            full[i] = a
        return fn(*full)

    am = jax.sharding.get_abstract_mesh()
    use = am if (not am.empty and tuple(am.axis_names) == tuple(mesh.axis_names)) else mesh
    return jax.shard_map(body, mesh=use, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
        *[args[i] for i in live])
