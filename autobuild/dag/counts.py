"""Node counts of the full-size graphs, against the reference's hand-written graphs (autobuild.md §2.2).

Measured with ``family_dag(name)`` (full size, meta device); layers + combine nodes:

============  =====================  ======================  =====
family        ours                   reference               delta
============  =====================  ======================  =====
dit           370 = 201 + 169        369 = 201 + 168          +1
pixart α/Σ    540 = 287 + 253        568 = 287 + 281         -28
hunyuan       828 = 487 + 341        844 = 474 + 370 (39/40) -16
sdv15/sdv14   478 = 294 + 184        432 = 294 + 138         +46
sdxl          1348 = 803 + 545       1316 = 803 + 513        +32
mnist_dit     84 = 47 + 37           (not in the reference)
============  =====================  ======================  =====

Layer nodes agree everywhere (one per quantizer key, DiT's 54 tied time-embedder copies folded into
block 0's), except that Hunyuan's reference builds only 39 of 40 blocks. The combine nodes differ where
the reference drew a node that joins nothing, or left out a join that the forward pass performs:

* **dit (+1)**: the output head is AdaLN, ``norm_out(x)*(1+scale)+shift`` with scale/shift from
  ``proj_out_1(t-emb)``: one ``norm`` node. The reference wired x -> proj_out_1 -> proj_out_2 (its own
  [QUIRK]); here proj_out_1 is fed by the time embedding and both meet in the ``norm``.
* **pixart (-28)**: the reference has a ``norm`` node between the self-attention residual and CA-Q in
  each block; PixArt applies no norm there (diffusers: "For PixArt norm2 isn't applied here"), so there
  is nothing to draw.
* **hunyuan (-16 = +13 +10 -40 +1)**: block 39 is included (the reference's ``range(39)`` [BUG]): +13
  layers (11 + two skip halves) and, counted the reference's way, +10 combine nodes (9 + its skip
  join). Per block the reference has 9 combine nodes, here 8 (-40): it draws the
  two plain, unconditioned LayerNorms (before CA and FF) as ``norm`` nodes and gives ``norm1.linear``
  combine features as if it were the AdaLN application; here ``norm1.linear`` is an ordinary layer
  node feeding one AdaLN-shift ``norm`` node (``norm(x) + shift``), and plain norms join nothing.
  Likewise the output head gets a real ``norm`` node after ``norm_out.linear`` (+1).
  Totals: 487 layers; 341 = 40 blocks x 8 + 19 skip ``cat`` + 1 time ``embed`` + 1 output ``norm``.
* **sdv15 (+46)**: the reference omits residual joins the U-Net performs: 22 time-embedding adds
  (``conv1 + time_emb_proj``, ``embed``), 16 transformer-model residuals (``proj_out + input``) and the
  identity residuals of the 8 resblocks without a shortcut conv. Its ``add_qdiff``/``add`` pairs are
  the ``cat``/``add`` pairs here.
* **sdxl (+32)**: as SD1.5 (+17 time-embedding adds, +11 transformer residuals, +6 identity residuals,
  +9 ``cat`` joins of the split up-block conv1 halves), minus the reference's 11 ``dummy_input`` nodes,
  which fan an input out and join nothing.
"""
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
