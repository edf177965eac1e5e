"""GATv2 sensitivity predictor over configuration graphs.

Layout (after the reference, docs/design.md §3, with its hard-coded index tables replaced by per-graph
read-out masks):

* :class:`NodeEncoder`: embeddings of the categorical codes (quant, bits, op, block) + a linear map of
  the numeric features -> MLP -> ``h0 >= 0``.
* ``layers`` x (GATv2Conv -> BatchNorm -> ReLU) with residuals: ``h_l = relu(bn(gat(h_{l-1}))) + h_{l-1}``;
  every ``h_l >= 0``.
* :class:`HopReadout`: per hop k, ``g_k`` = mean of ``h_k`` over the graph's read-out nodes of hop k
  (``hop_mask[:, k]``); hop score ``s_k = ||g_k||_1``. Since ``h >= 0`` this equals the mean per-node L1
  norm over the read-out nodes, which is what makes scoring a unit by its output node's norm meaningful.
* A regression head on ``g_L`` gives the prediction (in standardised target units). With ``additive``, a
  linear map of ``g_0`` (the mean hop-0 embedding of the layer nodes, i.e. a sum of per-layer terms) is
  added: per-layer option effects are close to additive in log FID, and this path learns them directly
  while the message-passing head models the interactions.
* With ``shift_dim`` k > 0 (``x_num[:, 2:]``: each layer's measured output change under its option, projected on
  k signature components, autobuild/output_shift.py) a :class:`ShiftReadout` sums, over the layer nodes, that
  change plus a correction message passing learns from the node's neighbourhood (zero at initialisation), and an
  MLP of this summed signed change is added to the prediction: where the changes of several layers add and cancel
  (mnist_unet), the damage is a nonlinear function of their sum that no per-layer term expresses.
"""
from __future__ import annotations

import torch
from torch import nn

from .data import NUM_BIT_CODES, NUM_QUANT_CODES
from .pyg import GATv2Conv, scatter

__all__ = ["NodeEncoder", "HopReadout", "ShiftReadout", "SensitivityGNN"]


class NodeEncoder(nn.Module):
    """Node features -> non-negative hop-0 embedding ``h0``."""

    def __init__(self, num_ops: int, num_blocks: int, hidden: int = 64, cat_dim: int = 8, num_numeric: int = 2):
        super().__init__()
        self.quant = nn.Embedding(NUM_QUANT_CODES, cat_dim)
        self.bits = nn.Embedding(NUM_BIT_CODES, cat_dim)
        self.op = nn.Embedding(num_ops, 2 * cat_dim)
        self.block = nn.Embedding(num_blocks, cat_dim)
        self.numeric = nn.Sequential(nn.BatchNorm1d(num_numeric), nn.Linear(num_numeric, cat_dim))
        self.mix = nn.Sequential(nn.Linear(6 * cat_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())

    def forward(self, x_cat: torch.Tensor, x_num: torch.Tensor) -> torch.Tensor:
        parts = [self.quant(x_cat[:, 0]), self.bits(x_cat[:, 1]), self.op(x_cat[:, 2]),
                 self.block(x_cat[:, 3]), self.numeric(x_num)]
        return self.mix(torch.cat(parts, dim=-1))


class HopReadout(nn.Module):
    """Masked mean pool per hop level: ``[N, d]`` x ``[N]`` mask -> ``[B, d]``."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        weight = mask.to(h.dtype).unsqueeze(-1)
        total = scatter(h * weight, batch, dim=0, dim_size=num_graphs, reduce="sum")
        count = scatter(weight, batch, dim=0, dim_size=num_graphs, reduce="sum").clamp_min(1.0)
        return total / count


class ShiftReadout(nn.Module):
    """Summed signed output change per graph: ``x_shift`` [N, k] + ``correction(h)`` [N, k] over the layer nodes
    (``mask`` [N]) -> ``[B, k]``. The correction, a linear map of the node embedding ``h`` [N, d], starts at zero,
    so the readout starts as the measured sum."""

    def __init__(self, hidden: int, shift_dim: int):
        super().__init__()
        self.correction = nn.Linear(hidden, shift_dim)
        nn.init.zeros_(self.correction.weight)
        nn.init.zeros_(self.correction.bias)

    def forward(self, x_shift: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, batch: torch.Tensor,
                num_graphs: int) -> torch.Tensor:
        change = (x_shift + self.correction(h)) * mask.to(h.dtype).unsqueeze(-1)
        return scatter(change, batch, dim=0, dim_size=num_graphs, reduce="sum")


class SensitivityGNN(nn.Module):
    """``forward(batch) -> {"pred": [B], "hop_scores": [B, layers + 1], "graph_embeddings": [B, layers + 1, d]}``.

    ``batch``: a PyG ``Data``/``Batch`` with ``x_cat`` [N, 4], ``x_num`` [N, 2 + shift_dim], ``edge_index``,
    ``hop_mask`` [N, layers + 1] and (for several graphs) ``batch``."""

    def __init__(self, num_ops: int, num_blocks: int, hidden: int = 64, layers: int = 4, heads: int = 1,
                 dropout: float = 0.0, additive: bool = False, shift_dim: int = 0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.config = dict(num_ops=num_ops, num_blocks=num_blocks, hidden=hidden, layers=layers, heads=heads,
                           dropout=dropout, additive=additive, shift_dim=shift_dim)
        self.encoder = NodeEncoder(num_ops, num_blocks, hidden, num_numeric=2 + shift_dim)
        self.convs = nn.ModuleList(GATv2Conv(hidden, hidden // heads, heads=heads, concat=True, dropout=dropout)
                                   for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        self.readout = HopReadout()
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.additive = nn.Linear(hidden, 1) if additive else None
        self.shift_readout = ShiftReadout(hidden, shift_dim) if shift_dim else None
        self.shift_head = (nn.Sequential(nn.BatchNorm1d(shift_dim), nn.Linear(shift_dim, hidden), nn.ReLU(),
                                         nn.Linear(hidden, 1)) if shift_dim else None)

    @property
    def num_hops(self) -> int:
        return len(self.convs)

    def hop_embeddings(self, batch) -> list[torch.Tensor]:
        """Node embeddings ``[h_0, ..., h_L]``, each ``[N, hidden]`` and non-negative."""
        width = 2 + self.config["shift_dim"]
        if batch.x_num.shape[-1] != width:
            raise ValueError(f"this predictor reads x_num [N, {width}] (2 + {self.config['shift_dim']} output-change "
                             f"coordinates); got {list(batch.x_num.shape)}: encode the graphs with its template")
        h = self.encoder(batch.x_cat, batch.x_num)
        hs = [h]
        for conv, norm in zip(self.convs, self.norms):
            h = torch.relu(norm(conv(h, batch.edge_index))) + h
            hs.append(h)
        return hs

    def node_embeddings(self, batch, hop: int | None = None) -> torch.Tensor:
        """``h_hop`` ([N, hidden]); all hops stacked ([N, L + 1, hidden]) when ``hop`` is None."""
        hs = self.hop_embeddings(batch)
        return torch.stack(hs, dim=1) if hop is None else hs[hop]

    def node_hop_norms(self, batch) -> torch.Tensor:
        """Per-node L1 norms ``||h_k(v)||_1`` for every hop: [N, L + 1] (unit scoring)."""
        return torch.stack([h.abs().sum(dim=-1) for h in self.hop_embeddings(batch)], dim=1)

    def forward(self, batch) -> dict[str, torch.Tensor]:
        hs = self.hop_embeddings(batch)
        n = hs[0].shape[0]
        index = getattr(batch, "batch", None)
        if index is None:
            index = torch.zeros(n, dtype=torch.long, device=hs[0].device)
        num_graphs = int(getattr(batch, "num_graphs", 1) or 1)
        mask = batch.hop_mask
        graph_embeddings = torch.stack([self.readout(h, mask[:, k], index, num_graphs) for k, h in enumerate(hs)], dim=1)
        pred = self.head(graph_embeddings[:, -1]).squeeze(-1)
        if self.additive is not None:
            pred = pred + self.additive(graph_embeddings[:, 0]).squeeze(-1)
        if self.shift_head is not None:
            summed = self.shift_readout(batch.x_num[:, 2:], hs[-1], mask[:, 0], index, num_graphs)
            pred = pred + self.shift_head(summed).squeeze(-1)
        return {"pred": pred,
                "hop_scores": graph_embeddings.abs().sum(dim=-1),
                "graph_embeddings": graph_embeddings}
