"""Mesh BFS (shard_map + all_to_all over 8 simulated CPU devices) equals the one-device BFS."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sqattn.science.cayley import growth, growth_reference, lrx, lx, pancake
from sqattn.science.cayley.sharded import sharded_growth


def mesh_of(num_devices: int) -> Mesh:
    return Mesh(np.array(jax.devices()[:num_devices]), ("states",))


@pytest.mark.parametrize("graph", [lrx(6), lx(6)], ids=lambda g: g.name)
def test_eight_devices_equal_one(graph):
    assert len(jax.devices()) >= 8, "tests/conftest.py sets 8 simulated CPU devices"
    # chunk 16: big layers take several rounds per device (8 on one device), and send buckets overflow and grow.
    eight = sharded_growth(graph, mesh_of(8), chunk_size=16)
    single = growth(graph)
    assert eight.layer_sizes == single.layer_sizes == growth_reference(graph)
    np.testing.assert_array_equal(eight.layers[eight.diameter], single.layers[eight.diameter])
    if graph.inverse_closed:
        assert sharded_growth(graph, mesh_of(1), chunk_size=16).layer_sizes == eight.layer_sizes


def test_sharded_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="coset graph"):
        sharded_growth(pancake(4).with_central_state([0, 0, 1, 1]), mesh_of(2))
    with pytest.raises(ValueError, match="1-D mesh with axis 'states'"):
        sharded_growth(lrx(4), Mesh(np.array(jax.devices()[:2]), ("data",)))
