"""Growth functions of Cayley and Schreier coset graphs in JAX (after CayleyPy, arXiv 2509.19162).

``growth(lrx(10)).layer_sizes`` is the sphere-size vector of the LRX Cayley graph of S_10; ``sharded_growth`` runs
the same search over a device mesh. See :mod:`bfs` for the algorithm and ``experiments/cayley_growth.py`` for
measured tables.
"""

from sqattn.science.cayley.bfs import GrowthResult, bucket, find_path, growth, growth_reference, growth_sorted
from sqattn.science.cayley.dense import growth_dense
from sqattn.science.cayley.encoding import Encoding
from sqattn.science.cayley.sharded import sharded_growth
from sqattn.science.cayley.groups import (FAMILIES, GraphDef, all_transpositions, burnt_pancake, coxeter,
                                          cyclic_coxeter, family, full_reversals, lrx, lx, make_graph, pancake,
                                          stars, top_spin)

__all__ = [
    "Encoding", "FAMILIES", "GraphDef", "GrowthResult", "all_transpositions", "bucket", "burnt_pancake", "coxeter",
    "cyclic_coxeter", "family", "find_path", "full_reversals", "growth", "growth_reference", "lrx", "lx",
    "make_graph", "pancake", "stars", "top_spin", "growth_dense", "growth_sorted",
    "sharded_growth",
]
