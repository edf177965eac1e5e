"""The torch_geometric names autobuild uses, imported once without torch_geometric's import-time
``torch.jit.script is deprecated`` FutureWarning (torch >= 2.10 deprecates the decorator it applies to a
few of its own helpers; nothing in autobuild scripts anything). Only that warning, only during the import."""
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from torch_geometric.data import Batch, Data
    from torch_geometric.nn import GATv2Conv
    from torch_geometric.utils import scatter

__all__ = ["Batch", "Data", "GATv2Conv", "scatter"]
