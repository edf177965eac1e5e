"""Readable node labels: layer op types, block indices and scopes, from module paths.

Everything here is rule-based on diffusers' module names, so any denoiser built from diffusers parts
(or named like them) gets sensible labels; unknown names fall back to ``"Linear"``/``"Conv"``.
"""
from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

# Layer op labels, in a fixed order (stable codes for embeddings).
LAYER_OPS = ("t-Embed", "c-Embed", "Patchify", "AdaLN", "SA-Q", "SA-K", "SA-V", "SA-Out", "CA-Q", "CA-K", "CA-V",
             "CA-Out", "FF1", "FF2", "Res-In", "Res-tEmb", "Res-Out", "Res-Skip", "Proj-In", "Proj-Out", "Skip",
             "Down", "Up", "Conv-In", "Conv-Out", "Out", "Linear", "Conv")
# Combine op labels. "mul" (a product of two different layers' outputs, e.g. a SwiGLU gate) does not occur
# in the built-in families.
COMBINE_OPS = ("add", "matmul", "norm", "cat", "embed", "mul")

# (regex searched in the module path, label); first match wins.
_LAYER_RULES = (
    (r"timestep_embedder\.linear_[12]$|^time_embedding\.linear_[12]$|time_embed\.[02]$", "t-Embed"),
    (r"^(caption_projection|text_embedder|add_embedding)\.linear_[12]$|extra_embedder\.linear_[12]$"
     r"|(^|\.)(context_embedder|guidance_embedder\.linear_[12])$", "c-Embed"),
    (r"(^|\.)pos_embed\.proj$|(^|\.)(x_embedder|patch_embed)(\.proj)?$", "Patchify"),
    (r"(^|\.)norm1\.linear$|(^|\.)norm1_context\.linear$|^adaln_single\.linear$|^norm_out\.linear$"
     r"|^proj_out_1$|(^|\.)norm(_out)?\.linear$", "AdaLN"),
    (r"attn1\.to_q$", "SA-Q"), (r"attn1\.to_k$", "SA-K"), (r"attn1\.to_v$", "SA-V"),
    (r"attn1\.to_out\.0$", "SA-Out"),
    (r"attn2\.to_q$", "CA-Q"), (r"attn2\.(to_k|add_k_proj)$", "CA-K"), (r"attn2\.(to_v|add_v_proj)$", "CA-V"),
    (r"attn2\.to_out\.0$", "CA-Out"),
    (r"(^|\.)attn\.to_q$", "SA-Q"), (r"(^|\.)attn\.to_k$", "SA-K"), (r"(^|\.)attn\.to_v$", "SA-V"),
    (r"(^|\.)attn\.to_out\.0$", "SA-Out"),
    (r"(^|\.)ff\.net\.0\.proj$|(^|\.)ff\.linear_1$|(^|\.)mlp\.fc1$", "FF1"),
    (r"(^|\.)ff\.net\.2$|(^|\.)ff\.linear_2$|(^|\.)mlp\.fc2$", "FF2"),
    (r"resnets\.\d+\.conv1$", "Res-In"), (r"resnets\.\d+\.time_emb_proj$", "Res-tEmb"),
    (r"resnets\.\d+\.conv2$", "Res-Out"), (r"resnets\.\d+\.conv_shortcut$", "Res-Skip"),
    (r"attentions\.\d+\.proj_in$", "Proj-In"), (r"attentions\.\d+\.proj_out$", "Proj-Out"),
    (r"(^|\.)skip_linear$", "Skip"),
    (r"downsamplers\.\d+\.conv$", "Down"), (r"upsamplers\.\d+\.conv$", "Up"),
    (r"^conv_in$", "Conv-In"), (r"^conv_out$", "Conv-Out"),
    (r"^proj_out(_2)?$", "Out"),
)
_COMPILED = tuple((re.compile(p), label) for p, label in _LAYER_RULES)


def layer_op(path: str, module: nn.Module | None = None) -> str:
    """Op label of the quantizable layer at module ``path`` (e.g. ``"SA-Q"``, ``"Res-tEmb"``)."""
    for pattern, label in _COMPILED:
        if pattern.search(path):
            return label
    if module is not None and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "Conv"
    return "Linear"


def op_types(family) -> tuple[str, ...]:
    """The layer op labels that occur in ``family`` (a name or FamilySpec), in :data:`LAYER_OPS` order
    (from the full-size model on the meta device)."""
    if isinstance(family, str):
        return _registered_op_types(family)
    return _op_types(family)


@lru_cache(maxsize=None)
def _registered_op_types(name: str) -> tuple[str, ...]:
    from multiquant.families import get_family

    return _op_types(get_family(name))


def _op_types(spec) -> tuple[str, ...]:
    from multiquant.layers import quantizable_layers

    model = spec.build("full", device="meta")
    present = {layer_op(ref.path, model.get_submodule(ref.path)) for ref in quantizable_layers(model, spec)}
    return tuple(op for op in LAYER_OPS if op in present)


# ---------------------------------------------------------------------------------------------------------
# Blocks and scopes
# ---------------------------------------------------------------------------------------------------------
def block_lists(model: nn.Module) -> set[str]:
    """Paths of ModuleLists that hold repeated blocks: every item of one non-leaf class.

    ``to_out`` ([Linear, Dropout]) and ``ff.net`` ([GELU, Dropout, Linear]) are not block lists;
    ``transformer_blocks``, ``resnets``, ``attentions``, ``downsamplers`` are."""
    lists = set()
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            classes = {type(m) for m in module}
            first = module[0]
            if len(classes) == 1 and len(list(first.children())) > 0:
                lists.add(path)
    return lists


def scope_of(path: str, lists: set[str]) -> str:
    """The innermost repeated block holding ``path`` (e.g. ``transformer_blocks.3``,
    ``up_blocks.1.resnets.2``); for layers outside any block, the top-level module name."""
    parts = path.split(".") if path else []
    scope = None
    for i in range(1, len(parts)):
        if parts[i].isdigit() and ".".join(parts[:i]) in lists:
            scope = ".".join(parts[:i + 1])
    if scope is not None:
        return scope
    return parts[0] if parts else ""


def block_of(path: str, lists: set[str], n_down: int | None = None) -> int:
    """Block index of a module path: the index in the outermost block list (``transformer_blocks.i``,
    ``blocks.i``); for U-Nets down blocks, then the mid block, then up blocks; -1 outside blocks."""
    parts = path.split(".") if path else []
    if n_down is not None and parts:
        if parts[0] == "down_blocks" and len(parts) > 1:
            return int(parts[1])
        if parts[0] == "mid_block":
            return n_down
        if parts[0] == "up_blocks" and len(parts) > 1:
            return n_down + 1 + int(parts[1])
        return -1
    for i in range(1, len(parts)):
        if parts[i].isdigit() and ".".join(parts[:i]) in lists:
            return int(parts[i])
    return -1


def unet_down_count(model: nn.Module) -> int | None:
    """Number of down blocks of a U-Net (None for other models)."""
    down = getattr(model, "down_blocks", None)
    if isinstance(down, nn.ModuleList) and hasattr(model, "up_blocks"):
        return len(down)
    return None
