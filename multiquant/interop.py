"""A configuration in the terms other quantization tools read: a torchao per-module config map and a
``modules_to_not_convert`` skip list.

    plan = interop_plan(config, mq.layers, model)      # per module: what torchao / skip lists can express
    torchao_config(plan)                                # torchao FqnToConfig: UAQ layers -> IntxWeightOnlyConfig
    plan.modules_to_not_convert                         # layers the configuration keeps at 16 bits
    write_interop(plan, out_dir)                        # interop.json beside an export

What maps and what does not:
  - UAQ (``mse-b``) on an ``nn.Linear``: per-output-channel asymmetric uniform b-bit, which is torchao's
    ``IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=PerAxis(0), mapping_type=ASYMMETRIC)``.
    torchao chooses its own scale / zero point (min-max) when it quantizes: the format matches, the values
    are torchao's, not the exported MSE-searched grid (the packed export stays the exact form).
  - K-Means-C / K-Means-A (``kmeans-b``, ``kmeans_all-b``): a per-channel or per-tensor codebook, which no
    stock torchao weight format holds; such a layer stays dense in the torchao map and is listed under
    ``codebook_layers`` ("best option is a codebook": load the packed export for it).
  - ``fp16`` layers: dense in the map and in ``modules_to_not_convert`` (bitsandbytes / diffusers' quantizer
    configs take that list).
  - A split layer whose slices differ, or a convolution: dense in the map, with the reason.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .options import FP_OPTION, Option
from .utils import atomic_path

INTEROP_NAME = "interop.json"


@dataclass
class ModulePlan:
    path: str
    options: list[str]  # one per input-channel slice
    torchao: dict | None  # {"config": "IntxWeightOnlyConfig", "bits": b, ...} or None (kept dense)
    reason: str  # why the map keeps it dense, or "uniform" where it maps


@dataclass
class InteropPlan:
    modules: dict[str, ModulePlan] = field(default_factory=dict)

    @property
    def modules_to_not_convert(self) -> list[str]:
        """Modules whose every slice the configuration keeps at 16 bits."""
        return [p for p, m in self.modules.items() if all(o == FP_OPTION for o in m.options)]

    @property
    def codebook_layers(self) -> dict[str, list[str]]:
        return {p: m.options for p, m in self.modules.items()
                if any(Option.parse(o).method in ("kmeans", "kmeans_all") for o in m.options)}

    @property
    def uniform_layers(self) -> dict[str, int]:
        return {p: m.torchao["bits"] for p, m in self.modules.items() if m.torchao is not None}

    def to_json(self) -> dict:
        return {"torchao": {p: m.torchao for p, m in self.modules.items()},
                "modules_to_not_convert": self.modules_to_not_convert,
                "codebook_layers": self.codebook_layers,
                "dense_in_torchao": {p: m.reason for p, m in self.modules.items() if m.torchao is None}}


def interop_plan(config: dict, layers, model: nn.Module | None = None) -> InteropPlan:
    """Per quantizable module (``layers``: ``mq.layers``), how torchao and skip lists can express ``config``.
    ``model`` (any device, meta too) tells Linear from Conv; without it every module counts as a Linear."""
    by_path: dict[str, list] = {}
    for ref in layers:
        by_path.setdefault(ref.path, []).append(ref)
    plan = InteropPlan()
    for path, refs in by_path.items():
        refs = sorted(refs, key=lambda r: r.cols or (0, 0))
        options = [config[r.key] for r in refs]
        parsed = [Option.parse(o) for o in options]
        is_linear = model is None or isinstance(model.get_submodule(path), nn.Linear)
        torchao, reason = None, "uniform"
        if all(o == FP_OPTION for o in options):
            reason = "kept at 16 bits by the configuration"
        elif any(o.method in ("kmeans", "kmeans_all") for o in parsed):
            reason = "best option is a codebook (K-Means): no torchao weight format holds it; use the packed export"
        elif len(set(options)) > 1:
            reason = f"split layer with slices {options}: torchao quantizes a module's weight as one"
        elif not is_linear:
            reason = "convolution: torchao's weight-only configs cover nn.Linear"
        else:
            torchao = {"config": "IntxWeightOnlyConfig", "bits": parsed[0].bits, "granularity": "PerAxis(0)",
                       "mapping_type": "ASYMMETRIC"}
        plan.modules[path] = ModulePlan(path, options, torchao, reason)
    return plan


def torchao_config(plan: InteropPlan):
    """The torchao ``FqnToConfig`` of a plan (modules absent from it stay as they are)."""
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis
    from torchao.quantization.quant_primitives import MappingType

    fqn = {path: IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerAxis(0),
                                      mapping_type=MappingType.ASYMMETRIC)
           for path, bits in plan.uniform_layers.items()}
    return FqnToConfig(fqn_to_config=fqn)


def write_interop(plan: InteropPlan, out_dir: str | os.PathLike) -> Path:
    """``interop.json`` (torchao map, skip list, codebook layers, reasons) in ``out_dir``, written atomically."""
    path = Path(out_dir) / INTEROP_NAME
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(plan.to_json(), indent=1))
    return path
