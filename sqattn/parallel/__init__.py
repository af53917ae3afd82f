"""Parallelism: device mesh and logical-axis rules (sharding), later CAD and expert-parallel programs."""

from sqattn.parallel.sharding import (LOGICAL_AXIS_RULES, MESH_AXES, constrain, make_mesh, mesh_rules,
                                      param_shardings, spec_for)

__all__ = ["LOGICAL_AXIS_RULES", "MESH_AXES", "constrain", "make_mesh", "mesh_rules", "param_shardings",
           "spec_for"]
