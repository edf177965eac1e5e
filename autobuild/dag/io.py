"""Save and load DAGs as plain JSON (node order, attributes and edges preserved)."""
from __future__ import annotations

import json
from pathlib import Path

import networkx as nx

__all__ = ["dag_to_json", "dag_from_json", "save_dag", "load_dag"]


def dag_to_json(graph: nx.DiGraph) -> dict:
    return {"graph": dict(graph.graph), "nodes": [{"id": n, **attrs} for n, attrs in graph.nodes(data=True)],
            "edges": [[u, v] for u, v in graph.edges]}


def dag_from_json(obj: dict) -> nx.DiGraph:
    graph = nx.DiGraph(**obj.get("graph", {}))
    for node in obj["nodes"]:
        attrs = dict(node)
        graph.add_node(attrs.pop("id"), **attrs)
    graph.add_edges_from((u, v) for u, v in obj["edges"])
    return graph


def save_dag(graph: nx.DiGraph, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dag_to_json(graph), indent=1))
    return path


def load_dag(path: str | Path) -> nx.DiGraph:
    return dag_from_json(json.loads(Path(path).read_text()))
