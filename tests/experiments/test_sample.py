"""sqattn.sample and experiments/sample.py: restore a trained run, decode with the cache, sample text.

One module-scoped ``lm_tiny:runlocal`` run in float32 (4 steps on the 8 simulated devices, checkpoints at
steps 2 and 4) is shared by every test; restores go onto one device.
"""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from sqattn import configs, sample
from sqattn.train import checkpoint as ckpt_lib
from sqattn.train import state as state_lib
from sqattn.train import tasks as tasks_lib
from sqattn.train import train_and_evaluate
from tests.testing import assert_close

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "def load(path):\n    return "     # 28 bytes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sample_run"))
    config = configs.get("lm_tiny:runlocal")
    # float32 compute, so step decoding and the parallel forward agree to rounding and argmax is exact.
    config.model.dtype = "float32"
    result = train_and_evaluate(config, workdir, progress=False)
    assert result["step"] == config.num_steps
    return workdir, config, result


@pytest.fixture(scope="module")
def loaded(run):
    workdir, _, _ = run
    return sample.load_model(workdir)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    """Parallel (training-form) forward: tokens [b, t] -> logits [b, t, V]."""
    return nnx.merge(graphdef, state)(tokens)[0]


def logits_of(model, tokens) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_logits(graphdef, state, jnp.asarray(tokens, jnp.int32)))


def _params(model) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------------------------- load_model
def test_load_model_restores_the_trained_params(run, loaded):
    workdir, config, _ = run
    model, cfg = loaded
    assert cfg.model.to_dict() == config.model.to_dict()
    # A fresh restore of the full train state on the run's own 8-device mesh: params must match bit for bit.
    setup = state_lib.make_setup(config)
    ckpt = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints)
    try:
        state = ckpt.restore(ckpt.latest_step(), setup.abstract_state, setup.state_shardings,
                             json.loads(config.to_json_best_effort()))
    finally:
        ckpt.close()
    assert int(state["step"]) == config.num_steps
    got, want = _params(model), jax.device_get(state["params"])
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    # ... and they are trained, not the initialisation.
    init = _params(state_lib.build_model(config))
    moved = max(float(np.max(np.abs(g - i))) for g, i in zip(jax.tree.leaves(got), jax.tree.leaves(init)))
    assert moved > 1e-4, moved
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert {d for x in leaves for d in x.devices()} == {jax.devices()[0]}     # restored onto one device
    # ... as plain single-device arrays, not on a 1-device mesh (jitted steps over them compile once)
    assert all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in leaves)


def test_loaded_model_reproduces_the_runs_final_eval_loss(run, loaded):
    _, config, result = run
    model, _ = loaded
    _, eval_ds = tasks_lib.get_task(config.task).make_datasets(config)
    nll, weight = 0.0, 0.0
    for i in range(config.eval_batches):
        batch = eval_ds.batch(i)
        logits = logits_of(model, batch["inputs"])                                  # [b, t, V]
        logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
        tok_nll = -jnp.take_along_axis(logp, jnp.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
        nll += float(jnp.sum(tok_nll * batch["weights"]))
        weight += float(np.sum(batch["weights"]))
    assert_close(nll / weight, result["eval_loss"], jnp.float32, "eval loss of the restored model")


def test_load_model_reads_only_the_params(run, monkeypatch):
    """The optimizer state is neither read nor allocated: the full-state restore is never called."""
    import inspect
    import orbax.checkpoint as ocp
    if "partial_restore" not in inspect.signature(ocp.args.PyTreeRestore).parameters:
        pytest.skip("this orbax has no partial restore; load_model restores the whole state")
    workdir, _, _ = run
    monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", lambda *a, **k: pytest.fail("full-state restore"))
    model, _ = sample.load_model(workdir)
    assert jax.tree.leaves(_params(model))


def test_load_model_at_an_earlier_step(run, loaded):
    workdir, _, _ = run
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert len(steps) >= 2, steps                     # runlocal checkpoints every 2 of its 4 steps
    early, _ = sample.load_model(workdir, step=steps[0])
    latest = _params(loaded[0])
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(_params(early)),
                                                           jax.tree.leaves(latest))]
    assert max(diffs) > 1e-5
    missing = steps[-1] + 1
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint at step {missing} .*available steps: "
                                                rf"\[{', '.join(map(str, steps))}\]"):
        sample.load_model(workdir, step=missing)


def test_load_model_errors(run, tmp_path):
    workdir, _, _ = run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample.load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        sample.load_model(str(tmp_path))
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        sample.load_model(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        sample.load_model(str(tmp_path))


# ----------------------------------------------------------------------------------------------- save_model
def test_save_model_round_trip_and_resume(run, loaded, tmp_path):
    _, config, _ = run
    model, _ = loaded
    out = str(tmp_path / "saved")
    where = sample.save_model(out, model, config, step=0)
    assert where == os.path.join(out, "checkpoints", "0")
    again, cfg = sample.load_model(out)
    assert cfg.model.to_dict() == config.model.to_dict()
    for g, w in zip(jax.tree.leaves(_params(again)), jax.tree.leaves(_params(model))):
        np.testing.assert_array_equal(g, w)
    # the trainer resumes the saved run (from step 0, with the saved weights) and writes its next checkpoints
    result = train_and_evaluate(config, out, progress=False)
    assert result["step"] == config.num_steps
    assert sample.load_model(out)[0] is not None
    # never overwritten: a second save into a workdir with a checkpoint fails and leaves it as it was
    before = sorted(os.listdir(os.path.join(out, "checkpoints")))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        sample.save_model(out, model, config)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == before


def test_save_model_rejects_a_model_its_config_does_not_build(run, loaded, tmp_path):
    _, config, _ = run
    other = ml_collections.ConfigDict(config.to_dict())
    other.model.d_model = 2 * config.model.d_model
    with pytest.raises(ValueError, match="do not match config.model"):
        sample.save_model(str(tmp_path / "bad"), loaded[0], other)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


# ----------------------------------------------------------------------------------------------- generate
def _check_greedy_against_parallel(model, prompts: np.ndarray, n: int) -> np.ndarray:
    """Greedy ``generate`` must pick argmax of the parallel forward's logits at every new position."""
    gen = sample.generate(model, prompts, n)
    gen2 = gen if gen.ndim == 2 else gen[None]
    p2 = prompts if prompts.ndim == 2 else prompts[None]
    assert gen2.shape == (p2.shape[0], n) and gen.dtype == np.int32
    t = p2.shape[1]
    logits = logits_of(model, np.concatenate([p2, gen2], axis=1))                   # [b, t + n, V]
    np.testing.assert_array_equal(gen2, np.argmax(logits[:, t - 1:t - 1 + n], axis=-1))
    return gen2


def test_greedy_generate_equals_parallel_argmax_trained(loaded):
    model, _ = loaded
    _check_greedy_against_parallel(model, sample.encode(PROMPT), 12)


@pytest.fixture(scope="module")
def untied(run):
    """An untrained model with an untied output head: unlike the tied one (and the 4-step run), whose greedy
    continuation repeats one byte, its greedy continuations vary, so agreement with the parallel forward is a
    non-trivial check of the cache."""
    _, config, _ = run
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.model.tie_embeddings = False
    return state_lib.build_model(cfg, seed=3)


def _prompts() -> np.ndarray:
    return np.stack([sample.encode(PROMPT), sample.encode(PROMPT[::-1])])           # [2, 28]


def test_greedy_generate_equals_parallel_argmax_batched(untied):
    gen = _check_greedy_against_parallel(untied, _prompts(), 12)
    assert len(np.unique(gen)) > 4, gen
    assert not np.array_equal(gen[0], gen[1])


def test_sampling_is_seeded_and_stays_in_top_k(untied):
    prompts, k, n = _prompts(), 5, 12
    a = sample.generate(untied, prompts, n, temperature=1.0, top_k=k, seed=0)
    np.testing.assert_array_equal(a, sample.generate(untied, prompts, n, temperature=1.0, top_k=k, seed=0))
    b = sample.generate(untied, prompts, n, temperature=1.0, top_k=k, seed=1)
    assert not np.array_equal(a, b)
    t = prompts.shape[1]
    for gen in (a, b):
        logits = logits_of(untied, np.concatenate([prompts, gen], axis=1))          # [2, t + n, V]
        topk = np.argsort(-logits[:, t - 1:-1], axis=-1)[..., :k]                   # [2, n, k]
        assert np.all(np.any(gen[..., None] == topk, axis=-1)), (gen, topk)


def test_generate_argument_errors(loaded):
    model, _ = loaded
    with pytest.raises(ValueError, match="t >= 1"):
        sample.generate(model, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample.generate(model, [1, 2], -1)
    with pytest.raises(ValueError, match="temperature"):
        sample.generate(model, [1, 2], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="integer"):
        sample.generate(model, np.array([1.0, 2.0]), 4)
    assert sample.generate(model, [1, 2], 0).shape == (0,)


def test_byte_helpers():
    text = "def f(x):\n    return 'é✓'"
    ids = sample.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert sample.decode(ids) == text
    assert sample.decode([0xE2, 0x9C, 0x93]) == "✓"
    assert sample.decode([104, 0xFF, 105]) == "h\ufffdi"    # invalid UTF-8 -> replacement char
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        sample.decode([300])


# ----------------------------------------------------------------------------------------------- binary
def test_sample_binary(run, loaded):
    """``python -m experiments.sample`` prints prompt + the same greedy continuation as the library."""
    workdir, _, _ = run
    model, _ = loaded
    expected = "def " + sample.complete(model, "def ", 8)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONIOENCODING="utf-8")
    cmd = [sys.executable, "-m", "experiments.sample", f"--workdir={workdir}", "--prompt=def ",
           "--max_new_tokens=8", "--temperature=0"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    assert out.stdout.decode("utf-8") == expected + "\n"
