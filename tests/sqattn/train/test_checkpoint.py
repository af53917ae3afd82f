"""checkpoint.has_checkpoint: what counts as a checkpoint in a workdir."""

from sqattn.train.checkpoint import has_checkpoint


def test_has_checkpoint(tmp_path):
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    assert not has_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints" / "12").mkdir()
    assert has_checkpoint(str(tmp_path))


def test_host_checksums_equal_the_device_ones_for_every_dtype():
    """Small states are summed in numpy, large ones by the jitted sums: the saved numbers must not depend on
    which, for any dtype (8-byte ones included), odd sizes and values with every bit pattern."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from sqattn.train import checkpoint as ck
    rng = np.random.default_rng(0)
    bits = lambda n, dt: rng.integers(0, 256, n * np.dtype(dt).itemsize, dtype=np.uint8).view(dt)  # noqa
    tree = {"f32": jnp.asarray(bits(37, np.float32).reshape(37)),
            "bf16": jnp.asarray(bits(3 * 7, np.uint16).reshape(3, 7)).view(jnp.bfloat16),
            "i8": jnp.asarray(bits(11, np.int8)), "u32": jnp.asarray(bits(5, np.uint32)),
            "bool": jnp.asarray(rng.integers(0, 2, 9).astype(bool)), "scalar": jnp.float32(3.5)}
    x64 = jax.enable_x64(True) if hasattr(jax, "enable_x64") else __import__(
        "jax.experimental", fromlist=["enable_x64"]).enable_x64()
    with x64:
        tree["f64"] = jnp.asarray(bits(13, np.float64))
        tree["i64"] = jnp.asarray(bits(4, np.int64))
        host = ck.checksums(tree)
        device = {k: [int(a), int(b)] for k, (a, b) in jax.device_get(ck._checksums_of(tree)).items()}
    assert host == {f"['{k}']": v for k, v in device.items()} and len(host) == 8
    flipped = dict(tree, u32=tree["u32"].at[2].set(tree["u32"][2] ^ np.uint32(1 << 17)))
    assert ck.checksums(flipped)["['u32']"][0] != host["['u32']"][0]
