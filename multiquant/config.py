"""Quantization configurations: ``{quantizer key: "method-bits" | "fp16"}``.

Sampling follows the reference (one p ~ U(a_l, a_u) per configuration; each layer 3-bit with probability p,
else 4-bit; method uniform over UAQ, K-Means-C, K-Means-A), but every configuration is reproducible from
(seed, index) alone and tied copies share the canonical layer's choice.

``quantize_(model, config, mq)`` writes the dequantized weights into the model in place (torchao style);
switching configurations only rewrites the layers whose option changed.
"""
from __future__ import annotations

import json
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import MissingFileError, UserError
from .layers import LayerRef
from .options import FP_OPTION, METHOD_NAMES, Option, OptionTable
from .safe_pickle import safe_load
from .utils import atomic_path, json_default, read_json


class ConfigError(UserError, ValueError):
    """A configuration that does not fit the model (unknown, missing or malformed layer entries)."""


# ---------------------------------------------------------------------------------------- sampling
def sample_random_config(layers: list[LayerRef], seed: int, index: int, a_l: float = 0.0, a_u: float = 1.0,
                         low_bits: int = 3, high_bits: int = 4, methods=METHOD_NAMES) -> dict[str, str]:
    """The ``index``-th random configuration of run ``seed`` (independent of every other index)."""
    if not 0.0 <= a_l <= a_u <= 1.0:
        raise ValueError(f"need 0 <= a_l <= a_u <= 1, got a_l={a_l}, a_u={a_u}")
    rng = np.random.default_rng([seed, index])
    p_low = rng.uniform(a_l, a_u)
    canonical = [ref for ref in layers if not ref.tied_to]
    low = rng.random(len(canonical)) < p_low
    method_idx = rng.integers(len(methods), size=len(canonical))
    chosen = {ref.key: str(Option(methods[m], low_bits if is_low else high_bits))
              for ref, is_low, m in zip(canonical, low, method_idx)}
    return OrderedDict((ref.key, chosen[ref.tied_to or ref.key]) for ref in layers)


def uniform_config(layers: list[LayerRef], option: str) -> dict[str, str]:
    """Every layer at the same option, e.g. ``uniform_config(layers, "mse-4")``."""
    Option.parse(option)
    return OrderedDict((ref.key, option) for ref in layers)


# -------------------------------------------------------------------------------------- validation
def validate_config(config: dict, layers: list[LayerRef], options=None, allow_missing: bool = False,
                    fill: str | None = None) -> dict[str, str]:
    """Check ``config`` against the model's layers; returns it in layer order.

    ``options`` restricts the allowed options (e.g. those in the multiquantizer). Missing layers are an
    error unless ``fill`` gives their option. Tied copies must agree with their canonical layer."""
    keys = {ref.key for ref in layers}
    unknown = [k for k in config if k not in keys]
    if unknown:
        raise ConfigError(f"configuration names {len(unknown)} layer(s) the model does not have, e.g. {unknown[0]!r}; "
                          f"check the model family (qua2sedimo inspect --model ... lists the layers)")
    out = OrderedDict()
    for ref in layers:
        # a tied copy missing from the file follows its canonical layer (AutoBuild writes only block 0's)
        option = config.get(ref.key, config.get(ref.tied_to) if ref.tied_to else None)
        if isinstance(option, (list, tuple)):  # quant_cache 'config' entries: [option, fp_bytes, q_bytes, err]
            if not option:
                raise ConfigError(f"layer {ref.key!r}: empty entry []; give an option string like 'mse-4'")
            option = option[0]
        option = option or fill
        if option is None:
            if allow_missing:
                continue
            raise ConfigError(f"configuration has no entry for layer {ref.key!r}: give every layer an option "
                              f"(or fill missing ones, e.g. --fill fp16)")
        if isinstance(option, (list, tuple)):  # quant_cache 'config' entries: [option, fp_bytes, q_bytes, err]
            option = option[0] if option else None
        if not isinstance(option, str):
            raise ConfigError(f"layer {ref.key!r}: option must be a string like 'mse-4', got {option!r}")
        try:
            Option.parse(option)
        except ValueError as err:
            raise ConfigError(f"layer {ref.key!r}: {err}") from None
        if options is not None and option != FP_OPTION and option not in options:
            raise ConfigError(f"layer {ref.key!r}: option {option!r} is not in the multiquantizer "
                              f"(available: {', '.join(options)}); rebuild it with those bits")
        out[ref.key] = option
    for ref in layers:
        if ref.tied_to and ref.key in out and ref.tied_to in out and out[ref.key] != out[ref.tied_to]:
            raise ConfigError(f"layer {ref.key!r} is a tied copy of {ref.tied_to!r} and must use the same option "
                              f"({out[ref.key]!r} != {out[ref.tied_to]!r})")
    return out


# ---------------------------------------------------------------------------------------------- I/O
def load_config(path: str | os.PathLike) -> dict[str, str]:
    """Read a configuration from the reference ``.pkl`` form (restricted unpickler) or ``.json``."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"configuration file {path} does not exist: check the path")
    data = read_json(path, "configuration file") if path.suffix == ".json" else safe_load(path)
    if isinstance(data, dict) and "bit_allocation" in data and "config" not in data:
        data = data["bit_allocation"]
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a dict of layer -> 'method-bits', got {type(data).__name__}")
    out = OrderedDict()
    for key, value in data.items():
        option = value[0] if isinstance(value, (list, tuple)) and value else value
        if not isinstance(key, str) or not isinstance(option, str):
            raise ConfigError(f"{path}: layer {key!r:.80} has {value!r:.60}; every value must be an option string "
                              f"like 'mse-4' (or the quant_cache form [option, fp_bytes, q_bytes, error])")
        out[key] = option
    return out


def save_config(config: dict, path: str | os.PathLike, also_json: bool = True, origin: dict | None = None) -> Path:
    """Write ``{layer: "method-bits"}`` as the reference ``.pkl`` (protocol 4) and, beside it, ``.json``.

    ``origin`` says what made the configuration (``{"kind": "built" | "search" | "greedy" | ..., "budget": ...,
    "command": ...}``); it goes into the ``.json`` as ``{"origin": ..., "config": ...}`` (the ``.pkl`` stays the
    reference's plain layer dict: the reference's reader rejects any other key). :func:`load_config_origin`
    reads it back; ``eval-configs`` records it with the scores, and ``report`` classifies by it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: str(v) for k, v in config.items()}
    targets = [path] + ([path.with_suffix(".json")] if also_json and path.suffix != ".json" else [])
    for target in targets:
        with atomic_path(target) as tmp:
            if target.suffix == ".json":
                body = plain if origin is None else {"origin": dict(origin), "config": plain}
                tmp.write_text(json.dumps(body, indent=1, default=json_default))
            else:
                with open(tmp, "wb") as f:
                    pickle.dump(plain, f, protocol=4)
    return path


def load_config_origin(path: str | os.PathLike) -> dict | None:
    """The ``origin`` recorded with a configuration file (from the ``.json``, or the ``.json`` beside a
    ``.pkl``), or ``None`` when the file records none."""
    path = Path(path)
    source = path if path.suffix == ".json" else path.with_suffix(".json")
    if not source.is_file():
        return None
    try:
        data = json.loads(source.read_text())
    except ValueError:
        return None
    origin = data.get("origin") if isinstance(data, dict) else None
    return dict(origin) if isinstance(origin, dict) else None


# ------------------------------------------------------------------------------------------- stats
def config_record(config: dict, table: dict, fp_prec: int, fp_bytes: int) -> dict:
    """The reference's per-configuration statistics (:meth:`multiquant.options.OptionTable.record`)."""
    return OptionTable(table, fp_prec).record(config, fp_bytes)


# ------------------------------------------------------------------------------------------- apply
class ConfigApplier:
    """Keeps the FP weights and writes any configuration's dequantized weights into the model in place."""

    def __init__(self, model: nn.Module, mq, fp_device=None):
        self.model, self.mq = model, mq
        self.layers = mq.layers
        self.fp_weights = {ref.key: ref.weight(model).detach().to(fp_device or ref.weight(model).device).clone()
                           for ref in self.layers}
        self.current = OrderedDict((ref.key, FP_OPTION) for ref in self.layers)

    @torch.no_grad()
    def apply(self, config: dict) -> int:
        """Apply ``config`` (validated against the checkpoint); returns how many layers changed."""
        config = validate_config(config, self.layers, options=self.mq.options)
        changed = 0
        for ref in self.layers:
            option = config[ref.key]
            if option == self.current[ref.key]:
                continue
            target = ref.weight(self.model)
            if option == FP_OPTION:
                target.copy_(self.fp_weights[ref.key])
            else:
                target.copy_(self.mq.dequantize(ref.key, option, dtype=target.dtype).to(target.device))
            self.current[ref.key] = option
            changed += 1
        return changed

    def restore(self) -> None:
        self.apply(OrderedDict((ref.key, FP_OPTION) for ref in self.layers))


_HANDLE = "_qua2sedimo_applier"  # the model owns its handle (and so its FP copy): freed with the model


def quantize_(model: nn.Module, config: dict, mq) -> ConfigApplier:
    """Apply a configuration in place and return its handle, the :class:`ConfigApplier` that holds the model's
    FP weights (``.model``, ``.current``, ``.apply(other)``, ``.restore()``). The first call on a model copies
    its FP weights; later calls with the same checkpoint reuse that handle (:func:`applier_of`), so switching
    configurations never takes an already-quantized weight for the FP one."""
    applier = applier_of(model)
    if applier is None or applier.mq is not mq:
        applier = ConfigApplier(model, mq)
        object.__setattr__(model, _HANDLE, applier)  # not a registered submodule or parameter
    applier.apply(config)
    return applier


def applier_of(model: nn.Module) -> ConfigApplier | None:
    """The handle :func:`quantize_` made for ``model`` (``None`` if it never quantized it)."""
    return getattr(model, _HANDLE, None)
