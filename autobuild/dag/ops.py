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
             "CA-Out", "FF1", "FF2", "Res-In", "Res-tEmb", "Res-cEmb", "Res-Out", "Res-Skip", "Proj-In", "Proj-Out",
             "Skip", "Down", "Up", "Conv-In", "Conv-Out", "Out", "Linear", "Conv")
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


# ---------------------------------------------------------------------------------------------------------
# Models without naming rules (plain nn.Module families): blocks and op types derived from the module tree
# ---------------------------------------------------------------------------------------------------------
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TIME_TOKENS = ("time", "temb", "timestep", "t")
_COND_TOKENS = ("label", "labels", "class", "cond", "context", "text", "emb", "embed", "embedding", "y", "c")
_EMBED_PREFIXES = ("time", "temb", "timestep", "label", "class", "cond", "context", "text", "emb", "pos")


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[._\d]+", text.lower()) if t]


def _is_embedding_name(name: str) -> bool:
    return any(tok.startswith(_EMBED_PREFIXES) for tok in _tokens(name))


_IO_TOKENS = ("in", "input", "stem", "head", "out", "output", "final", "last", "first", "proj")


def _is_io_name(name: str) -> bool:
    return any(tok in _IO_TOKENS for tok in _tokens(name))


def derived_block_scopes(model: nn.Module) -> set[str]:
    """Module paths that are blocks of a model without naming rules: items of repeated-block lists, modules of
    a class that occurs at least twice (repeated sub-module structure), and top-level sub-modules that are
    not embeddings (``time_mlp``, ``label_emb`` ... stay global, as do the input and output layers)."""
    lists = block_lists(model)
    counts: dict[type, int] = {}
    for _, module in model.named_modules():
        if not isinstance(module, _CONTAINERS) and len(list(module.children())) > 0:
            counts[type(module)] = counts.get(type(module), 0) + 1
    scopes = set()
    for path, module in model.named_modules():
        if not path:
            continue
        if len(list(module.children())) == 0:  # a top-level layer between blocks (e.g. a strided conv) is one
            if "." not in path and not _is_embedding_name(path) and not _is_io_name(path) \
                    and isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                scopes.add(path)
            continue
        parent, _, last = path.rpartition(".")
        if (parent in lists and last.isdigit()) or (counts.get(type(module), 0) >= 2
                                                   and not isinstance(module, _CONTAINERS)):
            scopes.add(path)
        elif "." not in path and not isinstance(module, nn.ModuleList) and not _is_embedding_name(path):
            scopes.add(path)
    return scopes


def derived_block_of(path: str, scopes: set[str]) -> str | None:
    """The outermost block scope holding ``path`` (None: a global layer)."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix in scopes:
            return prefix
    return None


def derived_layer_op(path: str, model: nn.Module, in_block: bool) -> str:
    """Op label of a layer of a model without naming rules, from module names and classes: time and
    condition embeddings/projections, attention q/k/v/out, feed-forward, residual convs and skips,
    down/up-sampling, input/output layers."""
    module = model.get_submodule(path)
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    own = _tokens(name) or [name.lower()]
    near = _tokens(".".join(path.split(".")[-2:]))  # the layer's and its parent's names
    every = _tokens(path)
    parent_class = type(parent).__name__.lower()
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if any(t in _TIME_TOKENS for t in near) or any(t.startswith(("time", "temb", "timestep")) for t in every):
        return "Res-tEmb" if in_block else "t-Embed"
    if any(t in _COND_TOKENS or t.startswith(("label", "class", "cond", "context", "text", "emb")) for t in near):
        return "Res-cEmb" if in_block else "c-Embed"
    if "attn" in parent_class or "attention" in parent_class or any(t in ("attn", "attention") for t in near):
        key = own[-1]
        for names, label in ((("q", "query", "toq"), "SA-Q"), (("k", "key", "tok"), "SA-K"),
                             (("v", "value", "tov"), "SA-V"), (("qkv", "in"), "SA-Q")):
            if key in names or name.lower() in ("to_" + key, key + "_proj"):
                return label
        if any(t in ("out", "o", "proj") for t in own):
            return "SA-Out"
    if any(t in ("mlp", "ff", "ffn", "feedforward", "feed") for t in near):
        linears = [m for m in parent.children() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        return "FF1" if linears and linears[0] is module else "FF2"
    if any(t in ("skip", "shortcut", "residual", "nin", "res") for t in own):
        return "Res-Skip" if in_block else "Skip"
    residual = "res" in parent_class or (hasattr(parent, "conv1") and hasattr(parent, "conv2"))
    if residual and conv:  # conv1 / in_layers -> Res-In, conv2 / out_layers -> Res-Out
        first = name.lower().endswith("1") or name.lower().startswith("in")
        return "Res-In" if first else "Res-Out"
    if any(t.startswith("down") for t in near) or "down" in parent_class:
        return "Down"
    if any(t.startswith("up") for t in near) or "up" in parent_class:
        return "Up"
    if name.lower() in ("proj_in", "in_proj"):
        return "Proj-In"
    if name.lower() in ("proj_out", "out_proj"):
        return "Proj-Out"
    if not in_block and any(t in ("in", "input", "stem", "first") for t in own):
        return "Conv-In" if conv else "Patchify"
    if not in_block and any(t in ("out", "output", "final", "last", "head") for t in own):
        return "Conv-Out" if conv else "Out"
    return "Conv" if conv else "Linear"
