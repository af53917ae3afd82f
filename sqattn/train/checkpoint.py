"""Orbax checkpointing with automatic resume, integrity checks and fallback.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``meta`` holds the config the run was saved with and a
checksum of every saved array (two 32-bit sums of the array's raw bits: plain and position-weighted, computed on
the devices under any sharding). A restore recomputes them, so a flipped bit, a truncated or rewritten file is
caught rather than trained on. ``restore_latest_good`` walks the steps newest first: a checkpoint that cannot
be read or fails its checksums is moved aside to ``<workdir>/checkpoints.corrupt/<step>-<reason>`` (never
deleted) and the next older one is used, with a warning. Nothing here deletes a checkpoint except orbax's keep-N
rotation of older good ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("sqattn.train")


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint directory ``checkpoints/<step>``."""
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _target(abstract, shardings):
    """``ShapeDtypeStruct`` leaves carrying the shardings to restore into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _brief(e: Exception, limit: int = 300) -> str:
    """``Type: message`` cut to ``limit`` characters (tensorstore errors carry kilobytes of spec JSON)."""
    msg = str(e).split(" [tensorstore_spec", 1)[0]
    msg = msg if len(msg) <= limit else msg[:limit] + " ..."
    return f"{type(e).__name__}: {msg}"


class _DropClosedLoopTracebacks:
    """A ``sys.stderr`` wrapper that drops one kind of noise: after a restore fails, tensorstore's pending
    reads still complete on background threads and call back into orbax's already closed asyncio loop, each
    printing a ``RuntimeError: Event loop is closed`` traceback under the real, one-line error. Text is
    buffered per thread (those threads write while the main thread reports the error); every other write,
    other tracebacks included, passes through unchanged."""

    def __init__(self, stream):
        import threading
        self._stream = stream
        self._local = threading.local()

    def _buffers(self):
        if not hasattr(self._local, "held"):
            self._local.held, self._local.partial = [], ""
        return self._local

    def write(self, text: str) -> int:
        buf = self._buffers()
        buf.partial += text
        *lines, buf.partial = buf.partial.split("\n")
        for line in lines:
            self._line(buf, line + "\n")
        if not buf.held and buf.partial and not "Traceback".startswith(buf.partial[:9]):
            self._stream.write(buf.partial)
            buf.partial = ""
        return len(text)

    def _line(self, buf, line: str) -> None:
        if not buf.held and not line.startswith("Traceback (most recent call last):"):
            self._stream.write(line)
            return
        buf.held.append(line)
        if not line.startswith((" ", "Traceback")):          # the exception line ends the traceback
            block, buf.held = buf.held, []
            if line.strip() != "RuntimeError: Event loop is closed":
                self._stream.write("".join(block))

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _quiet_failed_restores() -> None:
    import sys
    if not isinstance(sys.stderr, _DropClosedLoopTracebacks):
        sys.stderr = _DropClosedLoopTracebacks(sys.stderr)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be read, or whose arrays do not match their saved checksums."""


# ----------------------------------------------------------------------------------------------- checksums
def _words(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as a flat uint32 vector (8-byte elements give two words)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = np.dtype(x.dtype).itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    w = jax.lax.bitcast_convert_type(x, unsigned)                           # [..., (2 for 8-byte)]
    return w.reshape(-1).astype(jnp.uint32)


@jax.jit
def _checksums_of(tree):
    def one(x):
        w = _words(x)                                                       # [n] uint32, sums wrap mod 2**32
        pos = jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)])
    return jax.tree.map(one, tree)


def _host_checksum(x) -> list[int]:
    """``_checksums_of`` for one array, in numpy on the host (the same words, the same uint32 arithmetic)."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
    w = np.ascontiguousarray(x).view(unsigned).reshape(-1).astype(np.uint32)   # 8-byte: low word first
    pos = np.arange(w.shape[0], dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return [int(np.sum(w, dtype=np.uint32)), int(np.sum(w * pos, dtype=np.uint32))]


HOST_CHECKSUM_BYTES = 256 << 20


def checksums(tree) -> dict[str, list[int]]:
    """``{path: [sum of words, position-weighted sum]}`` of every array leaf (mod 2**32).

    Any single flipped bit changes the first sum; reordered elements change the second. A state of at most
    ``HOST_CHECKSUM_BYTES`` whose arrays this process holds whole is summed in numpy on the host (no compile:
    the jitted version costs 1-4 s of compile per new state structure, more than small states take to sum);
    larger or multi-host states on the devices. Both give the same numbers.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    arrays = {jax.tree_util.keystr(p): x for p, x in leaves if hasattr(x, "dtype")}
    small = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in arrays.values()) <= HOST_CHECKSUM_BYTES
    if small and all(getattr(x, "is_fully_addressable", True) for x in arrays.values()):
        return {k: _host_checksum(x) for k, x in arrays.items()}
    sums = jax.device_get(_checksums_of(arrays))
    return {k: [int(v[0]), int(v[1])] for k, v in sums.items()}


def _verify(tree, expected: dict | None, where: str, prefix: str = "") -> None:
    """Raises ``CorruptCheckpointError`` naming the first array whose checksum differs from ``expected``."""
    if expected is None:                    # written before checksums existed
        log.warning("checkpoint %s has no checksums (written by an older sqattn); not verified", where)
        return
    got = checksums(tree)
    for key, value in got.items():
        want = expected.get(prefix + key)
        if want is None:
            raise CorruptCheckpointError(f"checkpoint {where}: array {prefix + key} has no saved checksum")
        if list(want) != value:
            raise CorruptCheckpointError(
                f"checkpoint {where}: array {prefix + key} does not match its saved checksum "
                f"(saved {want}, read {value}); the files were altered after the save")


class Checkpointer:
    """Saves and restores ``<workdir>/checkpoints``; ``keep`` = newest checkpoints kept (``None``: all, for
    readers that never save)."""

    def __init__(self, workdir: str, keep: int | None = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep} (0 would delete every checkpoint)")
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict, *, force: bool = True) -> None:
        """Saves ``state`` at ``step`` with ``meta`` plus the checksums of every array of ``state``."""
        meta = dict(meta, checksums=checksums(state))
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """``step``'s metadata (config, checksums); ``CorruptCheckpointError`` if it cannot be read."""
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
            raise CorruptCheckpointError(f"checkpoint {where} has unreadable metadata ({_brief(e)}). "
                                         f"It was left in place.") from e
        if not isinstance(meta, dict):
            raise CorruptCheckpointError(f"checkpoint {where} has malformed metadata ({type(meta).__name__})")
        return meta

    def _check_meta(self, step: int, config_json: dict) -> tuple[str, dict]:
        """Raises ``CheckpointError`` unless ``step``'s metadata is readable and its model config matches."""
        where = os.path.join(self.directory, str(step))
        meta = self.read_meta(step)
        saved_model = (meta or {}).get("config", {}).get("model")
        if saved_model is not None and saved_model != config_json.get("model"):
            raise CheckpointError(
                f"checkpoint {where} was written with a different model config; refusing to resume.\n"
                f"saved:   {json.dumps(saved_model, sort_keys=True)}\n"
                f"current: {json.dumps(config_json.get('model'), sort_keys=True)}\n"
                f"Use another --workdir, or the saved config.")
        return where, meta

    def restore(self, step: int, abstract_state: dict, shardings: dict, config_json: dict) -> dict:
        """Restores ``step`` into ``shardings``; checks that the model config matches the saved one."""
        where, meta = self._check_meta(step, config_json)
        target = _target(abstract_state, shardings)
        _quiet_failed_restores()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {where} could not be restored ({_brief(e)}). "
                                         f"It was left in place; move it aside to start over.") from e
        _verify(out["state"], meta.get("checksums"), where)
        return out["state"]

    def move_aside(self, step: int, reason: str) -> str:
        """Moves ``checkpoints/<step>`` to ``checkpoints.corrupt/<step>-<reason>-<time>``; returns the new path."""
        src = os.path.join(self.directory, str(step))
        dst_dir = self.directory + ".corrupt"
        os.makedirs(dst_dir, exist_ok=True)
        dst = os.path.join(dst_dir, f"{step}-{reason}-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.move(src, dst)
        self.manager.reload()
        return dst

    def restore_latest_good(self, abstract_state: dict, shardings: dict, config_json: dict,
                            on_meta=None) -> tuple[int, dict] | None:
        """Restores the newest checkpoint that reads back intact; ``None`` when there is no checkpoint.

        Newer checkpoints that are unreadable or fail their checksums are moved aside (``move_aside``) with a
        warning, but only once an older good one has been found: when none is good, nothing is moved and
        ``CheckpointError`` lists every step and what was wrong with it. A model-config mismatch is not
        corruption: it raises at once. ``on_meta(step, meta)`` runs before a step's arrays are read (the
        trainer's config comparison), and may raise to refuse the resume.
        """
        bad: list[tuple[int, CorruptCheckpointError]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                _, meta = self._check_meta(step, config_json)
                if on_meta is not None:
                    on_meta(step, meta)
                state = self.restore(step, abstract_state, shardings, config_json)
            except CorruptCheckpointError as e:
                log.warning("checkpoint step %d is unusable: %s", step, e)
                bad.append((step, e))
                continue
            for bad_step, err in bad:
                reason = "checksum" if "checksum" in str(err) else "unreadable"
                dst = self.move_aside(bad_step, reason)
                log.warning("checkpoint step %d moved aside to %s; resuming from step %d instead",
                            bad_step, dst, step)
            return step, state
        if bad:
            lines = "\n".join(f"  step {s}: {e}" for s, e in bad)
            raise CheckpointError(f"no usable checkpoint in {self.directory}; every one failed:\n{lines}\n"
                                  f"They were left in place. Move them aside to start over.")
        return None

    def restore_params(self, step: int, abstract_params, shardings, config_json: dict):
        """Restores only ``state["params"]`` of ``step`` (no optimizer state is read or allocated).

        Returns ``None`` where the installed orbax cannot restore part of a tree; restore the whole state
        then.
        """
        where, meta = self._check_meta(step, config_json)
        target = {"params": _target(abstract_params, shardings)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target)
        try:
            args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        except TypeError:             # an orbax without partial restore
            return None
        reader = ocp.PyTreeCheckpointer()
        _quiet_failed_restores()
        try:
            out = reader.restore(os.path.join(where, "state"), args=args)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {where} could not be restored ({_brief(e)}). "
                                         f"It was left in place.") from e
        finally:
            reader.close()        # an open reader's event loop prints tracebacks at exit
        _verify(out["params"], meta.get("checksums"), where, prefix="['params']")
        return out["params"]

    def close(self) -> None:
        self.manager.close()
