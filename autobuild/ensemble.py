"""The saved fold ensemble of a trained predictor: what is read after training (scores, configs, the report).

Files in a predictor directory (written as one set by :func:`save_ensemble`): ``ensemble.safetensors`` (all
fold weights, keys ``fold{f}.<param>``), ``ensemble.json`` (model config, graph template, target, per-fold
moments, priors and metrics) and ``metrics.json``; the JSON files carry the weights' sha256. No pickle.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from multiquant.errors import InputError, MissingFileError, UserError

from .data import ConfigDataset, GraphTemplate, cache_to_dataset, encode_options
from .gnn import SensitivityGNN
from .target import LearningPlan

__all__ = ["Ensemble", "load_ensemble", "save_ensemble", "prior_values", "kernel_values", "ENSEMBLE_WEIGHTS", "ENSEMBLE_CONFIG", "METRICS_FILE"]

ENSEMBLE_WEIGHTS = "ensemble.safetensors"
ENSEMBLE_CONFIG = "ensemble.json"
METRICS_FILE = "metrics.json"
FORMAT = "qua2sedimo-predictor-ensemble"


def _finite_or_none(obj):
    """NaN/inf -> None, so the files are strict JSON (a metric is NaN when e.g. a score is constant)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(_finite_or_none(json.loads(json.dumps(obj, default=_json_default))), f, indent=1, allow_nan=False)


from multiquant.utils import json_default as _json_default  # noqa: E402  (the one encoder)


def prior_values(prior: Mapping | None, records: Sequence[Mapping], columns: Sequence | None = None) -> torch.Tensor:
    """A fold's linear prior on records: ``coef`` over its own ``columns`` (one-hot and pair terms,
    :func:`autobuild.data.encode_options`), plus, for a ``ridge_shift`` prior, its ``shift`` coefficients over the
    quadratic output-change features of its own basis; priors saved before they carried columns use the
    ensemble's ``prior_columns``. No prior: zeros."""
    if prior is None:
        return torch.zeros(len(records), dtype=torch.float64)
    x = encode_options(records, prior.get("columns") or columns or ())
    value = x @ np.asarray(prior["coef"], dtype=np.float64) + prior["intercept"]
    if prior.get("shift"):  # the quadratic form of the summed output change (autobuild.train.fit_prior)
        from .output_shift import ShiftBasis, quadratic_shift_features

        shift = prior["shift"]
        value = value + quadratic_shift_features(records, ShiftBasis.from_json(shift["basis"])) @ np.asarray(
            shift["coef"], dtype=np.float64)
    if prior.get("kernel"):  # the kernel residual on the summed output change (autobuild.train.fit_shift_kernel)
        value = value + kernel_values(prior["kernel"], records)
    return torch.as_tensor(value)


def kernel_values(kernel: Mapping, records: Sequence[Mapping]) -> np.ndarray:
    """A saved kernel residual on records: ``sum_j dual_j exp(-gamma ||z - support_j||^2)`` with ``z`` the
    configuration's summed output-change coordinates on the kernel's own basis (its ``scale`` divided out)."""
    from .output_shift import ShiftBasis, summed_shift_coords

    z = summed_shift_coords(records, ShiftBasis.from_json(kernel["basis"])) / float(kernel["spread"])
    squared = _squared_distances(z, np.asarray(kernel["support"], dtype=np.float64))
    return np.exp(-float(kernel["gamma"]) * squared) @ np.asarray(kernel["dual"], dtype=np.float64)


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[len(a), len(b)]`` squared Euclidean distances between rows (rounding below zero clipped)."""
    return np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def save_ensemble(out_dir: str | Path, states: Sequence[Mapping[str, torch.Tensor]], infos: Sequence[Mapping],
                  template: GraphTemplate, metrics: Mapping) -> Path:
    """Write the three files as one set (a temporary directory renamed into place); ``ensemble.json`` and
    ``metrics.json`` carry the weights' sha256, which :func:`load_ensemble` checks."""
    from safetensors.torch import save_file

    from multiquant.utils import atomic_dir, check_writable_dir, file_sha256

    out = Path(out_dir)
    check_writable_dir(out.parent, what="predictor output directory")
    tensors = {f"fold{f}.{name}": t.contiguous() for f, state in enumerate(states) for name, t in state.items()}
    options = metrics["options"]
    with atomic_dir(out, (ENSEMBLE_WEIGHTS, ENSEMBLE_CONFIG, METRICS_FILE)) as tmp:
        save_file(tensors, str(tmp / ENSEMBLE_WEIGHTS), metadata={"format": FORMAT})
        digest = file_sha256(tmp / ENSEMBLE_WEIGHTS)
        config = {"format": FORMAT, "version": 1,
                  "model": {"num_ops": template.num_ops, "num_blocks": template.num_blocks, "hidden": options["hidden"],
                            "layers": options["layers"], "heads": options["heads"], "dropout": options["dropout"],
                            "additive": options["additive"], "shift_dim": template.shift_dim},
                  "target": metrics["target"], "learned": metrics["learned"], "prior_columns": metrics["prior_columns"],
                  "loss": metrics["loss"],
                  "seed": metrics["seed"], "weights_sha256": digest,
                  "folds": [dict(info) for info in infos], "template": template.to_json()}
        _write_json(tmp / ENSEMBLE_CONFIG, config)
        _write_json(tmp / METRICS_FILE, dict(metrics, weights_sha256=digest))
    return out


class Ensemble:
    """The K fold models of one training run.

    ``predict`` gives ``pred`` (target units: the fold-mean learned value composed with the records'
    exact configuration keys, see :class:`autobuild.target.LearningPlan`) and ``score`` (docs/design.md §5
    style: the sum over folds and hops of the training-z-scored hop score times that fold's test SRCC of
    the hop)."""

    def __init__(self, models: Sequence[SensitivityGNN], folds: Sequence[Mapping], template: GraphTemplate,
                 config: Mapping, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.models = list(models)
        self.folds = list(folds)
        self.template = template
        self.config = dict(config)
        # ensembles saved before the learning plan existed learned the target itself
        self.plan = LearningPlan.from_json(config.get("learned") or {"target": config.get("target", "target")})

    @property
    def num_hops(self) -> int:
        return self.models[0].num_hops

    def template_for(self, graph: nx.DiGraph, units: Iterable | None = None) -> GraphTemplate:
        """Template of another graph over the same denoiser (e.g. a unit subgraph), encoded with the
        training op vocabulary so that op codes mean the same thing."""
        return GraphTemplate.from_graph(graph, units, self.num_hops, op_vocab=self.template.op_vocab,
                                        shift_coords=self.template.shift_coords)

    def _weights(self, f: int) -> torch.Tensor:
        return torch.tensor([0.0 if (v is None or math.isnan(v)) else v for v in self.folds[f]["hop_srcc"]])

    def _batches(self, items, batch_size: int):
        from .pyg import Batch, Data

        if isinstance(items, ConfigDataset):
            for start in range(0, len(items), batch_size):
                yield items.collate(torch.arange(start, min(start + batch_size, len(items))))
        elif isinstance(items, Data) or hasattr(items, "num_graphs") and not isinstance(items, (list, tuple)):
            yield items
        else:
            items = list(items)
            if items and isinstance(items[0], Mapping):
                yield from self._batches(cache_to_dataset(items, self.template), batch_size)
            else:
                for start in range(0, len(items), batch_size):
                    yield Batch.from_data_list(items[start:start + batch_size])

    @torch.no_grad()
    def predict(self, records_or_datas, batch_size: int = 256, known=None) -> dict[str, np.ndarray]:
        """``records_or_datas``: scored-config records (encoded with the saved graph template), a list
        of ``Data``, a ``Batch`` or a :class:`ConfigDataset`. Returns numpy arrays ``pred`` [n] (target
        units), ``learned`` [n] (e.g. the predicted FID), ``score`` [n], ``hop_scores`` [n, L+1] (weighted
        z-scores summed over folds), ``fold_pred`` [K, n]. When the target reads configuration keys
        (``avg_bits`` ...) they come from the records, or from ``known`` ([n, K], in ``plan.known`` order)."""
        items = records_or_datas
        is_records = isinstance(items, (list, tuple)) and bool(items) and isinstance(items[0], Mapping)
        columns = self.config.get("prior_columns")
        if columns is not None and not is_records:
            raise ValueError("this predictor adds a linear prior over each configuration's per-layer options: "
                             "pass records (dicts with 'config')")
        if known is None and self.plan.known:
            if not is_records:
                raise InputError(f"this predictor composes its target with {', '.join(self.plan.known)}: pass "
                                 f"records (dicts with 'config' and those keys) or known=[n, {len(self.plan.known)}]")
            known = self.plan.known_values(items)
        known_t = torch.as_tensor(np.zeros((0, 0)) if known is None else np.asarray(known, dtype=np.float64))
        fold_learned, hop_z = [], []
        batches = list(self._batches(items, batch_size))
        for f, model in enumerate(self.models):
            info = self.folds[f]
            mean, std = torch.tensor(info["hop_score_mean"]), torch.tensor(info["hop_score_std"])
            preds, zs = [], []
            for batch in batches:
                out = {k: v.cpu() for k, v in model(batch.to(self.device)).items()}
                scale = info.get("learned_std", info.get("target_std"))  # older files: target_*
                shift = info.get("learned_mean", info.get("target_mean"))
                preds.append(out["pred"].double() * scale + shift)
                zs.append((out["hop_scores"] - mean) / std * self._weights(f))
            learned_f = torch.cat(preds)
            if columns is not None:
                learned_f = learned_f + prior_values(info.get("prior"), items, columns)
            fold_learned.append(learned_f)
            hop_z.append(torch.cat(zs))
        learned = torch.stack(fold_learned)
        hop_scores = torch.stack(hop_z).sum(0)
        mean_learned = learned.mean(0)  # averaged in the learned space (log FID), then composed
        # the folds' disagreement in the learned space: an uncertainty (e.g. for exploring where it is large)
        return {"pred": self.plan.compose(mean_learned, known_t).numpy(),
                "learned": (mean_learned.exp() if self.plan.log else mean_learned).numpy(),
                "learned_std": learned.std(0, unbiased=False).numpy(),
                "score": hop_scores.sum(1).numpy(), "hop_scores": hop_scores.numpy(),
                "fold_pred": torch.stack([self.plan.compose(v, known_t) for v in learned]).numpy()}

    @torch.no_grad()
    def score_nodes(self, batch, node_index: torch.Tensor, hops: int | torch.Tensor) -> np.ndarray:
        """Unit scores (docs/design.md §5): for each given node (e.g. each unit variant's output node, by
        global index into ``batch``), sum over folds of ``(||h_hop(v)||_1 - mu_f) / sigma_f * srcc_f[hop]``."""
        node_index = torch.as_tensor(node_index, dtype=torch.long)
        hops = torch.as_tensor(hops, dtype=torch.long).expand_as(node_index)
        total = torch.zeros(len(node_index), dtype=torch.float64)
        for f, model in enumerate(self.models):
            info = self.folds[f]
            all_norms = model.node_hop_norms(batch.to(self.device)).cpu()
            # A unit deeper than the network's receptive field reads the deepest hop the network has.
            hops = hops.clamp_max(all_norms.shape[1] - 1)
            norms = all_norms[node_index, hops].double()
            mean = torch.tensor(info["node_norm_mean"], dtype=torch.float64)[hops]
            std = torch.tensor(info["node_norm_std"], dtype=torch.float64)[hops]
            total += (norms - mean) / std * self._weights(f).double()[hops]
        return total.numpy()


def load_ensemble(directory: str | Path, device: str = "cpu") -> Ensemble:
    """Load the fold ensemble written by :func:`train_predictor` (safetensors + JSON, no pickle), checking
    that the three files belong to one save (shared weights sha256)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from multiquant.utils import file_sha256

    directory = Path(directory)
    retrain = "train it again with `qua2sedimo train-predictor ... --out DIR`"
    if not (directory / ENSEMBLE_CONFIG).is_file():
        left = sorted(p.name for p in directory.parent.glob(f".{directory.name}.old-*"))
        raise MissingFileError(f"{directory} is not a predictor directory (no {ENSEMBLE_CONFIG})"
                               + (f"; an interrupted save left {left[0]}: rename it back to {directory.name}"
                                  if left else f": pass the --out of train-predictor, or {retrain}"))
    try:
        config = json.loads((directory / ENSEMBLE_CONFIG).read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"format {config.get('format') if isinstance(config, dict) else None!r}")
        digest = file_sha256(directory / ENSEMBLE_WEIGHTS)
        if config.get("weights_sha256") not in (None, digest):
            raise InputError(f"{ENSEMBLE_WEIGHTS} is not the file this {ENSEMBLE_CONFIG} was saved with "
                             f"(weights from another save or damaged)")
        if (directory / METRICS_FILE).is_file():
            metrics_digest = json.loads((directory / METRICS_FILE).read_text()).get("weights_sha256")
            if metrics_digest not in (None, digest):
                raise InputError(f"{METRICS_FILE} belongs to another save than {ENSEMBLE_WEIGHTS}")
        tensors = load_file(str(directory / ENSEMBLE_WEIGHTS), device=str(device))
        models = []
        for f in range(len(config["folds"])):
            prefix = f"fold{f}."
            state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
            model = SensitivityGNN(**config["model"]).to(device)
            model.load_state_dict(state, strict=True)  # strict: a mismatch is an error, not a silent skip
            models.append(model.eval())
        ensemble = Ensemble(models, config["folds"], GraphTemplate.from_json(config["template"]), config, device)
    except FileNotFoundError as err:
        raise MissingFileError(f"{directory} lacks {Path(err.filename or '?').name}: {retrain}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise UserError(f"{directory} is not a consistent predictor ensemble ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else err!r:.200}): {retrain}") from None
    return ensemble