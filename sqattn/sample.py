"""Load a trained model from its workdir and sample from it (used by ``experiments/sample.py`` and colabs).

  model, config = load_model("/tmp/lm_tiny")                      # latest checkpoint, on one device
  ids = generate(model, encode("def "), 200, temperature=0.8, top_k=40)
  print(decode(ids))

Decoding runs the model's recurrent form: ``LM.init_cache`` then ``LM.step`` once per token, inside one jitted
``lax.scan`` for the prompt (prefill) and one for the new tokens. Greedy when ``temperature == 0``.
Tokens of byte-level models (data sources in ``sqattn.train.tasks.BYTE_LEVEL_SOURCES``) are UTF-8 bytes.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sqattn.parallel import sharding
from sqattn.train import checkpoint as ckpt_lib
from sqattn.train import state as state_lib
from sqattn.train import tasks as tasks_lib


# ----------------------------------------------------------------------------------------------- loading
def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with, rebuilt from ``<workdir>/config.json``.

    Raises:
      FileNotFoundError: ``workdir`` does not exist or holds no ``config.json``.
    """
    return ml_collections.ConfigDict(_read_config_json(workdir))


def _read_config_json(workdir: str) -> dict:
    """``<workdir>/config.json`` as plain JSON (what the trainer compares checkpoints against).

    Raises:
      FileNotFoundError: ``workdir`` does not exist or holds no ``config.json``.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a training run "
                                f"(python -m experiments.train --workdir=...)")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a training workdir "
                                f"(experiments.train writes config.json there when a run starts)")
    with open(path) as f:
        return json.load(f)


def _on_one_device(config_json: dict) -> ml_collections.ConfigDict:
    """The config of ``config_json`` with every mesh axis of size 1."""
    config = ml_collections.ConfigDict(config_json)
    for axis in sharding.MESH_AXES:
        config.mesh[axis] = 1
    return config


def single_device_mesh() -> jax.sharding.Mesh:
    """A mesh of the first device with every axis of ``sharding.MESH_AXES`` of size 1."""
    devices = np.asarray(jax.devices()[:1]).reshape((1,) * len(sharding.MESH_AXES))
    return jax.sharding.Mesh(devices, sharding.MESH_AXES)


def load_model(workdir: str, step: int | None = None, *,
               mesh: jax.sharding.Mesh | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict]:
    """Rebuilds a run's model and restores its parameters from a checkpoint.

    Args:
      workdir: the run's directory (``config.json`` and ``checkpoints/<step>/``).
      step: checkpoint step to restore; ``None`` = the latest.
      mesh: where to place the parameters; ``None`` = one device (the config's mesh is overridden to size 1) and
        the parameters come back as plain single-device arrays, not arrays on a 1-device mesh: jitted training
        steps over them then compile once (a mesh-placed input makes the updated state's placement differ
        from the input's, so step 2 compiled again) and ran ~2x faster on CPU in our measurements.

    Returns:
      ``(model, config)``: an ``nnx`` model holding the checkpoint's parameters, and the run's config.

    Raises:
      FileNotFoundError: no workdir, no ``config.json``, no checkpoint, or no checkpoint at ``step``.
      sqattn.train.checkpoint.CheckpointError: the checkpoint exists but cannot be restored.
    """
    config_json = _read_config_json(workdir)
    config = _on_one_device(config_json)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir) or not os.listdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint in {os.path.abspath(ckpt_dir)}: the run in {workdir!r} has not "
                                f"saved one yet (see config.checkpoint_every)")
    checkpointer = ckpt_lib.Checkpointer(workdir)      # a reader: never rotates anything away
    try:
        steps = sorted(checkpointer.all_steps())
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {checkpointer.directory} (only incomplete "
                                    f"or foreign entries: {sorted(os.listdir(ckpt_dir))})")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint at step {step} in {checkpointer.directory}; "
                                    f"available steps: {steps}")
        setup = state_lib.make_setup(config, mesh or single_device_mesh())
        params = checkpointer.restore_params(step, setup.abstract_state["params"],
                                             setup.state_shardings["params"], config_json)
        if params is None:            # an orbax without partial restore: read the whole train state
            params = checkpointer.restore(step, setup.abstract_state, setup.state_shardings, config_json)["params"]
    finally:
        checkpointer.close()
    if mesh is None:
        # Uncommitted arrays (what jnp.asarray makes), not committed ones: restoring straight into a
        # SingleDeviceSharding was measured to compile a fine-tune step twice and run it 4x slower.
        params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params)
    model = nnx.merge(setup.graphdef, params)
    return model, config


def save_model(workdir: str, model: nnx.Module, config: ml_collections.ConfigDict, *, step: int = 0) -> str:
    """Writes ``model`` as a run directory: ``config.json`` and ``checkpoints/<step>/`` (its parameters and a
    fresh optimizer state), in the trainer's format.

    ``load_model(workdir)`` then returns the same model, ``experiments.sample --workdir`` samples from it, and
    ``experiments.train`` with the same model config continues training it from ``step``. Use it for models
    made outside the trainer (converted, grafted, fine-tuned with adapters merged).

    Returns:
      The checkpoint directory.

    Raises:
      FileExistsError: ``workdir`` already holds a checkpoint (never overwritten).
      ValueError: the model's parameters do not match what ``config.model`` builds (names or shapes).
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if ckpt_lib.has_checkpoint(workdir):
        raise FileExistsError(f"{os.path.abspath(ckpt_dir)} already holds a checkpoint; save to another workdir "
                              f"(nothing was written)")
    config_json = json.loads(config.to_json_best_effort())
    setup = state_lib.make_setup(_on_one_device(config_json), single_device_mesh())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = setup.abstract_state["params"]
    got_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want_shapes = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(want)}
    if got_shapes != want_shapes:
        diff = sorted(set(got_shapes.items()) ^ set(want_shapes.items()))[:6]
        raise ValueError(f"the model's parameters do not match config.model (model_name "
                         f"{config.get('model_name')!r}); first differences (path, shape): {diff}")
    params = jax.tree.map(lambda x, a: jnp.asarray(x, a.dtype), params, want)
    state = {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": setup.tx.init(params)}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_json, f, indent=2, sort_keys=True)
    checkpointer = ckpt_lib.Checkpointer(workdir, int(config.get("keep_checkpoints", 3)))
    try:
        checkpointer.save(step, state, {"config": config_json})
    finally:
        checkpointer.close()
    return os.path.join(os.path.abspath(ckpt_dir), str(step))


# ----------------------------------------------------------------------------------------------- decoding
def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, greedy: bool, top_k: int) -> jax.Array:
    """Next tokens [b] from logits [b, V] f32: argmax, or a draw from softmax(logits / T) over the top k."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]                      # [b, 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "top_k"))
def _generate(graphdef, state, prompt: jax.Array, key: jax.Array, temperature: jax.Array, *,
              max_new_tokens: int, greedy: bool, top_k: int) -> jax.Array:
    """prompt [b, t] int32 -> new tokens [b, max_new_tokens] int32."""
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    cache = model.init_cache(b, t + max_new_tokens)

    def prefill(cache, tok):                                           # tok [b]
        logits, cache = model.step(tok, cache)
        return cache, logits

    cache, logits = jax.lax.scan(prefill, cache, prompt.T)             # logits [t, b, V]

    def decode(carry, i):
        logits, cache = carry                                          # logits [b, V]: predicts token i
        tok = _sample(logits, jax.random.fold_in(key, i), temperature, greedy, top_k)
        logits, cache = model.step(tok, cache)                         # the last call's output is unused
        return (logits, cache), tok

    _, toks = jax.lax.scan(decode, (logits[-1], cache), jnp.arange(max_new_tokens))   # toks [n, b]
    return toks.T


def generate(model: nnx.Module, prompt_tokens: Sequence[int] | np.ndarray, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """Continues ``prompt_tokens`` by ``max_new_tokens`` tokens with step-by-step (cached) decoding.

    Args:
      model: an LM with ``init_cache(batch, max_len)`` and ``step(token[b], cache) -> (logits[b, V], cache)``.
      prompt_tokens: ``[t]`` or ``[b, t]`` token ids, ``t >= 1``.
      max_new_tokens: tokens to generate (``>= 0``).
      temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
      top_k: when sampling, keep only the ``top_k`` most likely tokens (0 = all).
      seed: sampling seed; the draw for new token ``i`` uses ``fold_in(key(seed), i)``.

    Returns:
      The new tokens only, int32 ``[max_new_tokens]`` (or ``[b, max_new_tokens]`` for a 2-D prompt).
    """
    prompt = np.asarray(prompt_tokens)
    if prompt.ndim not in (1, 2) or prompt.shape[-1] == 0:
        raise ValueError(f"prompt_tokens must be [t] or [b, t] with t >= 1, got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_tokens must be integer ids, got dtype {prompt.dtype}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = no truncation), got {top_k}")
    batched = prompt.ndim == 2
    prompt2 = prompt if batched else prompt[None]                      # [b, t]
    greedy = temperature == 0
    graphdef, state = nnx.split(model)
    toks = _generate(graphdef, state, jnp.asarray(prompt2, jnp.int32), jax.random.key(seed),
                     jnp.float32(temperature if not greedy else 1.0), max_new_tokens=int(max_new_tokens),
                     greedy=greedy, top_k=0 if greedy else int(top_k))
    out = np.asarray(jax.device_get(toks), dtype=np.int32)             # [b, n]
    return out if batched else out[0]


# ----------------------------------------------------------------------------------------------- bytes
def bits_per_byte(model: nnx.Module, data_cfg, *, seq_len: int, eval_tokens: int, batch_size: int,
                  progress: bool = False, desc: str = "eval") -> float:
    """Bits per byte of LM ``model`` over the first ``eval_tokens // seq_len`` eval windows of ``seq_len`` bytes
    of the data source ``data_cfg`` (at least one batch; all of a finite source at most)."""
    import math

    from sqattn import data
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.seq_len = seq_len
    ds = data.make_dataset(cfg, batch_size=batch_size, split="eval")
    n = max(1, eval_tokens // (seq_len * batch_size))
    if ds.num_batches is not None:
        n = min(n, ds.num_batches)
    graphdef, state = nnx.split(model)
    nll = weight = 0.0
    it = range(n)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"{desc} @{seq_len}", unit="batch", leave=False, dynamic_ncols=True)
    for i in it:
        b = ds.batch(i)
        s, w = _nll_sum(graphdef, state, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
                        jnp.asarray(b["weights"]))
        nll, weight = nll + float(s), weight + float(w)
    return nll / max(weight, 1.0) / math.log(2.0)


@jax.jit
def _nll_sum(graphdef, state, inputs, targets, weights):
    """(sum of next-byte NLL in nats, sum of weights) of one batch."""
    logits, _ = nnx.merge(graphdef, state)(inputs)
    nll, weight, _ = tasks_lib.weighted_cross_entropy(logits, targets, weights)
    return nll, weight


def is_byte_level(config) -> bool:
    """Whether the run's tokens are bytes (so ``encode``/``decode`` apply)."""
    return config.data.name in tasks_lib.BYTE_LEVEL_SOURCES and config.model.get("vocab_size", 256) >= 256


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as int32 token ids [len(bytes)]."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Byte token ids -> text; invalid UTF-8 becomes U+FFFD."""
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"byte ids must lie in [0, 255], got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def complete(model: nnx.Module, prompt: str, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> str:
    """Byte-level text completion: ``decode(generate(model, encode(prompt), ...))`` (the new text only)."""
    if not prompt:
        raise ValueError("prompt must be non-empty (decoding starts from the prompt's last byte)")
    return decode(generate(model, encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                           seed=seed))
