"""Orbax checkpointing with automatic resume.

Layout: ``<workdir>/checkpoints/<step>/{state, meta}``; ``meta`` holds the config the run was started with.
A restore that fails (corrupt or incompatible checkpoint) raises ``CheckpointError`` naming the directory and
leaves every file in place; nothing here ever deletes a checkpoint except orbax's keep-N rotation of older
good ones.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a checkpoint directory ``checkpoints/<step>``."""
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _target(abstract, shardings):
    """``ShapeDtypeStruct`` leaves carrying the shardings to restore into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int):
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
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()

    def _check_meta(self, step: int, config_json: dict) -> str:
        """Raises ``CheckpointError`` unless ``step``'s metadata is readable and its model config matches."""
        where = os.path.join(self.directory, str(step))
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "unreadable"
            raise CheckpointError(f"checkpoint {where} has unreadable metadata ({type(e).__name__}: {e}). "
                                  f"It was left in place; move it aside to start over or restore by hand.") from e
        saved_model = (meta or {}).get("config", {}).get("model")
        if saved_model is not None and saved_model != config_json.get("model"):
            raise CheckpointError(
                f"checkpoint {where} was written with a different model config; refusing to resume.\n"
                f"saved:   {json.dumps(saved_model, sort_keys=True)}\n"
                f"current: {json.dumps(config_json.get('model'), sort_keys=True)}\n"
                f"Use another --workdir, or the saved config.")
        return where

    def restore(self, step: int, abstract_state: dict, shardings: dict, config_json: dict) -> dict:
        """Restores ``step`` into ``shardings``; checks that the model config matches the saved one."""
        where = self._check_meta(step, config_json)
        target = _target(abstract_state, shardings)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} could not be restored ({type(e).__name__}: {e}). "
                                  f"It was left in place; move it aside to start over.") from e
        return out["state"]

    def restore_params(self, step: int, abstract_params, shardings, config_json: dict):
        """Restores only ``state["params"]`` of ``step`` (no optimizer state is read or allocated).

        Returns ``None`` where the installed orbax cannot restore part of a tree; restore the whole state
        then.
        """
        where = self._check_meta(step, config_json)
        target = {"params": _target(abstract_params, shardings)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target)
        try:
            args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        except TypeError:             # an orbax without partial restore
            return None
        try:
            out = ocp.PyTreeCheckpointer().restore(os.path.join(where, "state"), args=args)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} could not be restored ({type(e).__name__}: {e}). "
                                  f"It was left in place.") from e
        return out["params"]

    def close(self) -> None:
        self.manager.close()
