"""Node counts of the full-size graphs, and those of the reference's hand-written graphs they are checked
against; docs/design.md §2 explains every difference."""
from __future__ import annotations

import networkx as nx

__all__ = ["REFERENCE_NODE_COUNTS", "NODE_COUNTS", "count_nodes"]

# graph nodes of the reference's graphs (NUM_*_NODES); hunyuan: 39 of its 40 blocks
REFERENCE_NODE_COUNTS = {"dit": 369, "pixart_alpha": 568, "pixart_sigma": 568, "hunyuan": 844, "sdv15": 432,
                         "sdv14": 432, "sdxl": 1316}
# (layers, combine) of the traced full-size graphs
NODE_COUNTS = {"dit": (201, 169), "pixart_alpha": (287, 253), "pixart_sigma": (287, 253), "hunyuan": (487, 341),
               "sdv15": (294, 184), "sdv14": (294, 184), "sdxl": (803, 545), "mnist_dit": (47, 37)}


def count_nodes(graph: nx.DiGraph) -> dict:
    """{"nodes", "layers", "combine"} of a DAG."""
    layers = sum(1 for _, a in graph.nodes(data=True) if a.get("kind") == "layer")
    return {"nodes": graph.number_of_nodes(), "layers": layers, "combine": graph.number_of_nodes() - layers}
