"""Denoiser -> DAG of quantizable layers and combine ops (traced, not hand-written), the units scored
later, and renders.

    graph = build_dag(model, family)            # or family_dag("pixart_alpha") on the meta device
    block_units = units(graph, "block")         # Unit(name, nodes, output, hops, layers, type, block)
    render_dag(graph, "dag.png", "dag.svg")
"""
from .counts import NODE_COUNTS, REFERENCE_NODE_COUNTS, count_nodes
from .io import dag_from_json, dag_to_json, load_dag, save_dag
from .ops import COMBINE_OPS, LAYER_OPS, layer_op, op_types
from .render import render_dag
from .trace import build_dag, family_dag
from .units import UNIT_TYPES, Unit, receptive_field, unit_subgraph, units

__all__ = ["build_dag", "family_dag", "layer_op", "op_types", "LAYER_OPS", "COMBINE_OPS", "Unit", "units",
           "unit_subgraph", "receptive_field", "UNIT_TYPES", "render_dag", "save_dag", "load_dag", "dag_to_json",
           "dag_from_json", "count_nodes", "NODE_COUNTS", "REFERENCE_NODE_COUNTS"]
