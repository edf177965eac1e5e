"""The paper's qualitative claims, checked against evidence from one testbed (docs/design.md §7).

The claims (documented in the reference description of the paper, "Qualitative insights"):

* ``t_embed``: the time embedding (t-Embed) is sensitive;
* ``c_embed``: the condition embedding is much less sensitive than the time embedding;
* ``methods``: U-Nets prefer the uniform quantizer (UAQ), DiTs the cluster ones (K-Means-C / K-Means-A);
* ``resblocks``: U-Net ResNet blocks are more sensitive than its transformer blocks;
* ``out_head``: the output projection is sensitive (the paper: more so in a DiT than in a U-Net head, checked
  across testbeds by :func:`compare_testbeds`);
* ``sa_q_k``: SA-Q tolerates low bits better than SA-K (the paper's 3.4-bit PixArt-alpha configuration puts SA-Q
  at 3 bits more often).

Nothing here knows a model. Layers are grouped by the op labels of the denoiser's DAG (``autobuild.dag``: from
diffusers names or, for a plain ``nn.Module``, from its module tree), the backbone kind (U-Net or transformer)
follows from which ops exist, and every verdict is computed from the figures it prints:

* layer evidence (:class:`LayerSource`): one sensitivity per layer, higher = more sensitive (a model's predicted
  change of log FID when the layer drops from 4 to 3 bits, a one-layer sweep's FID degradation, the predictor's
  node-level score drop). A layer's *percentile* is the fraction of the other layers it out-ranks (ties count
  half): 1 = the most sensitive layer, 0 = the least.
* method evidence (:class:`MethodSource`): *contests*, each a figure per method where lower is better (uniform
  configurations' FID at one width; one layer's predicted log FID or one-layer degradation under each method).
  UAQ's pairwise win rate against each K-Means method over the contests measures the preference (0.5 = none).

Rules (one place, :data:`RULES`): a group is *sensitive* when its mean percentile is at least 2/3 (top third)
and *not sensitive* at or below 1/2; a comparison holds when the difference of mean percentiles is at least
0.25 (``c_embed``, ``resblocks``) or the paired win rate is at least 2/3 (``sa_q_k``); a preference holds at a
win rate of at least 0.6 and is contradicted at or below 0.4. In between: inconclusive. Sources are combined by
:func:`combine`: a definite verdict stands when no primary source gives the opposite one; contradicting sources
make the claim inconclusive. Models whose held-out SRCC is within ``srcc_tie`` (0.01) of the best are all primary:
a thousandth of SRCC does not decide which model's reading counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

__all__ = ["LayerSource", "MethodSource", "Claim", "RULES", "HOLDS", "FAILS", "UNSURE", "NOT_APPLICABLE",
           "percentiles", "backbone_kind", "check_claims", "combine", "sensitive_parts", "compare_testbeds",
           "CLAIMS"]

HOLDS, FAILS, UNSURE, NOT_APPLICABLE = "holds", "does not hold", "inconclusive", "not applicable"
RULES = {"sensitive": 2 / 3, "not_sensitive": 1 / 2, "difference": 0.25, "paired": 2 / 3, "prefer": 0.6,
         "srcc_tie": 0.01, "permutations": 5000, "seed": 0}
TIME_OPS, COND_OPS = ("t-Embed", "Res-tEmb"), ("c-Embed", "Res-cEmb")
OUT_OPS = ("Out", "Conv-Out")
RES_PREFIX = "Res-"
TRANSFORMER_OPS = ("SA-Q", "SA-K", "SA-V", "SA-Out", "CA-Q", "CA-K", "CA-V", "CA-Out", "FF1", "FF2", "Proj-In",
                   "Proj-Out")
UNIFORM, CLUSTER = ("mse",), ("kmeans", "kmeans_all")
METHOD_LABEL = {"mse": "UAQ", "kmeans": "K-Means-C", "kmeans_all": "K-Means-A"}
CLAIMS = {
    "t_embed": "The time embedding (t-Embed) is sensitive.",
    "c_embed": "The condition embedding is much less sensitive than the time embedding.",
    "methods": "U-Nets prefer the uniform quantizer (UAQ), DiTs the cluster quantizers (K-Means).",
    "resblocks": "U-Net ResNet blocks are more sensitive than transformer blocks.",
    "out_head": "The output projection is sensitive (more so in a DiT than in a U-Net head).",
    "sa_q_k": "SA-Q tolerates low bits better than SA-K.",
}


@dataclass(frozen=True)
class LayerSource:
    """One sensitivity per layer (higher = more sensitive). ``primary``: the verdict is built from it (the
    best-validated model and the one-layer sweeps); others are shown beside it."""

    name: str
    values: Mapping[str, float]
    unit: str = ""
    primary: bool = True
    validation: str = ""  # e.g. "5-fold SRCC 0.80 on log FID"


@dataclass(frozen=True)
class MethodSource:
    """Contests: ``{contest name: {method: figure, lower = better}}`` (methods as in option names: ``mse``,
    ``kmeans``, ``kmeans_all``)."""

    name: str
    contests: Mapping[str, Mapping[str, float]]
    unit: str = ""
    primary: bool = True
    details: Mapping[str, str] = field(default_factory=dict)  # contest -> extra text (e.g. avg bits)


@dataclass
class Claim:
    id: str
    claim: str
    verdict: str
    summary: str
    by_source: list = field(default_factory=list)  # [{source, primary, verdict, summary, figures}]

    def as_dict(self) -> dict:
        return {"id": self.id, "claim": self.claim, "verdict": self.verdict, "summary": self.summary,
                "by_source": self.by_source}


# ------------------------------------------------------------------------------------------ figures
def percentiles(values: Mapping[str, float]) -> dict[str, float]:
    """Fraction of the other layers each layer out-ranks (ties count half): 1 = most sensitive. NaNs dropped."""
    keys = [k for k, v in values.items() if v is not None and np.isfinite(v)]
    if len(keys) < 2:
        return {k: 0.5 for k in keys}
    v = np.array([float(values[k]) for k in keys])
    below = (v[None, :] < v[:, None]).sum(axis=1)
    ties = (v[None, :] == v[:, None]).sum(axis=1) - 1
    return {k: float((below[i] + 0.5 * ties[i]) / (len(keys) - 1)) for i, k in enumerate(keys)}


def _ranks(values: Mapping[str, float]) -> dict[str, int]:
    """1 = most sensitive."""
    keys = [k for k, v in values.items() if v is not None and np.isfinite(v)]
    order = sorted(keys, key=lambda k: -float(values[k]))
    return {k: i + 1 for i, k in enumerate(order)}


def _permutation_p(pct: Mapping[str, float], group: Sequence[str]) -> float:
    """P(a random group of the same size has a mean percentile >= the group's): seeded (RULES['seed'])."""
    all_pct = np.array(list(pct.values()))
    size, observed = len(group), float(np.mean([pct[k] for k in group]))
    if size == 0 or size >= len(all_pct):
        return 1.0
    rng = np.random.default_rng(RULES["seed"])
    draws = np.array([all_pct[rng.choice(len(all_pct), size, replace=False)].mean()
                      for _ in range(RULES["permutations"])])
    return float((np.sum(draws >= observed - 1e-12) + 1) / (len(draws) + 1))


def backbone_kind(ops: Mapping[str, str]) -> str:
    """``"U-Net"`` when the DAG has residual-block layers and down/up sampling, ``"transformer"`` when it has
    attention or feed-forward layers and no residual blocks, else ``"other"``."""
    present = set(ops.values())
    if any(o.startswith(RES_PREFIX) for o in present) and present & {"Down", "Up"}:
        return "U-Net"
    if present & set(TRANSFORMER_OPS) and not any(o.startswith(RES_PREFIX) for o in present):
        return "transformer"
    return "other"


def _short(key: str) -> str:
    return key.removeprefix("model.").removesuffix(".weight_quantizer")


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def combine(verdicts: Sequence[str]) -> str:
    """The definite verdict (holds / does not hold) when no applicable source gives the opposite one (sources that
    are inconclusive do not veto it); ``inconclusive`` when definite verdicts contradict each other or none is
    definite; ``not applicable`` when no source applies."""
    real = [v for v in verdicts if v != NOT_APPLICABLE]
    if not real:
        return NOT_APPLICABLE
    definite = set(real) - {UNSURE}
    return definite.pop() if len(definite) == 1 else UNSURE


# ------------------------------------------------------------------------------------------ layer claims
def _group(ops: Mapping[str, str], pct: Mapping[str, float], wanted) -> list[str]:
    match = wanted if callable(wanted) else (lambda op: op in wanted)
    return [k for k, op in ops.items() if k in pct and match(op)]


def _group_sensitive(source: LayerSource, ops, wanted, what: str) -> dict:
    pct = percentiles(source.values)
    group = _group(ops, pct, wanted)
    if not group:
        return {"verdict": NOT_APPLICABLE, "summary": f"no {what} layer among the {len(pct)} layers",
                "figures": {}}
    ranks = _ranks(source.values)
    mean = float(np.mean([pct[k] for k in group]))
    p = _permutation_p(pct, group)
    verdict = HOLDS if mean >= RULES["sensitive"] else FAILS if mean <= RULES["not_sensitive"] else UNSURE
    layers = ", ".join(f"{_short(k)} {ranks[k]}/{len(pct)} ({_fmt(float(source.values[k]))})"
                       for k in sorted(group, key=lambda k: ranks[k]))
    return {"verdict": verdict, "summary": f"{what} ranks {layers}; mean percentile {mean:.2f} "
                                           f"(1 = most sensitive; random-group p = {p:.2f})",
            "figures": {"layers": {k: {"rank": ranks[k], "of": len(pct), "value": float(source.values[k]),
                                       "percentile": pct[k]} for k in group},
                        "mean_percentile": mean, "p_random_group": p}}


def _group_difference(source: LayerSource, ops, high, low, high_name: str, low_name: str) -> dict:
    pct = percentiles(source.values)
    a, b = _group(ops, pct, high), _group(ops, pct, low)
    if not a or not b:
        missing = high_name if not a else low_name
        return {"verdict": NOT_APPLICABLE, "summary": f"no {missing}", "figures": {}}
    ma, mb = float(np.mean([pct[k] for k in a])), float(np.mean([pct[k] for k in b]))
    diff = ma - mb
    verdict = HOLDS if diff >= RULES["difference"] else FAILS if diff <= 0 else UNSURE
    return {"verdict": verdict, "summary": f"mean percentile of {high_name} {ma:.2f} ({len(a)} layers) vs "
                                           f"{low_name} {mb:.2f} ({len(b)} layers): difference {diff:+.2f}",
            "figures": {"mean_percentile": {high_name: ma, low_name: mb}, "difference": diff,
                        "layers": {high_name: len(a), low_name: len(b)}}}


def _paired(source: LayerSource, ops, blocks: Mapping[str, object], first: str, second: str) -> dict:
    """Per block holding both ops: is ``first`` less sensitive than ``second``?"""
    by_block: dict = {}
    for key, op in ops.items():
        if op in (first, second) and key in source.values and np.isfinite(source.values[key]):
            by_block.setdefault(blocks.get(key), {})[op] = float(source.values[key])
    pairs = [(b, v[first], v[second]) for b, v in by_block.items() if first in v and second in v]
    if not pairs:
        return {"verdict": NOT_APPLICABLE, "summary": f"no block with both {first} and {second}", "figures": {}}
    wins = sum(1.0 if q < k else 0.5 if q == k else 0.0 for _, q, k in pairs)
    rate = wins / len(pairs)
    verdict = HOLDS if rate >= RULES["paired"] else FAILS if rate <= 1 - RULES["paired"] else UNSURE
    return {"verdict": verdict, "summary": f"{first} less sensitive than {second} in {wins:g} of {len(pairs)} blocks",
            "figures": {"blocks": len(pairs), "first_less_sensitive": wins, "rate": rate,
                        "pairs": {str(b): {first: q, second: k} for b, q, k in pairs}}}


# ------------------------------------------------------------------------------------------ method claim
def _method_preference(source: MethodSource, expected: str) -> dict:
    """UAQ's pairwise win rate against each K-Means method over the contests; ``expected``: "uniform"/"cluster"."""
    wins = total = 0.0
    won = {}
    for name, figures in source.contests.items():
        figures = {m: float(v) for m, v in figures.items() if v is not None and np.isfinite(v)}
        if not figures:
            continue
        won[name] = min(figures, key=figures.get)
        for u in (m for m in UNIFORM if m in figures):
            for c in (m for m in CLUSTER if m in figures):
                total += 1
                wins += 1.0 if figures[u] < figures[c] else 0.5 if figures[u] == figures[c] else 0.0
    if total == 0:
        return {"verdict": NOT_APPLICABLE, "summary": "no contest between UAQ and a K-Means method", "figures": {}}
    rate = wins / total  # UAQ over K-Means
    favour = rate if expected == "uniform" else 1 - rate
    verdict = HOLDS if favour >= RULES["prefer"] else FAILS if favour <= 1 - RULES["prefer"] else UNSURE
    counts = {METHOD_LABEL.get(m, m): sum(1 for w in won.values() if w == m) for m in dict.fromkeys(won.values())}
    if len(source.contests) <= 4:  # few contests (uniform configurations): every figure
        shown = "; ".join(f"{name}: " + ", ".join(f"{METHOD_LABEL.get(m, m)} {_fmt(float(v))}"
                                                  for m, v in sorted(f.items(), key=lambda kv: kv[1]))
                          + (f" ({source.details[name]})" if name in source.details else "")
                          for name, f in source.contests.items())
    else:
        shown = "best method per contest: " + ", ".join(f"{m} {n}" for m, n in sorted(counts.items(),
                                                                                     key=lambda kv: -kv[1]))
    return {"verdict": verdict,
            "summary": f"UAQ beats K-Means in {wins:g} of {total:g} pairwise comparisons (rate {rate:.2f}) over "
                       f"{len(won)} contests [{shown}]",
            "figures": {"uaq_pairwise_win_rate": rate, "comparisons": total, "contests": len(won),
                        "best_method_counts": counts}}


# ------------------------------------------------------------------------------------------ all claims
def _claim(cid: str, results: list[tuple[object, dict]]) -> Claim:
    by_source = [{"source": s.name, "primary": s.primary, "unit": s.unit, **r} for s, r in results]
    primary = [r["verdict"] for s, r in results if s.primary]
    verdict = combine(primary) if primary else NOT_APPLICABLE
    applicable = [v for v in primary if v != NOT_APPLICABLE]
    if verdict == UNSURE and {HOLDS, FAILS} <= set(applicable):
        why = "the primary sources contradict each other"
    elif verdict == UNSURE:
        why = "the figures fall between the rules' thresholds"
    elif verdict == NOT_APPLICABLE:
        why = "the model has no such part" if results else "no evidence"
    elif all(v == verdict for v in applicable):
        why = f"every primary source agrees ({len(applicable)})"
    else:
        why = f"{sum(v == verdict for v in applicable)} of {len(applicable)} primary sources; the others inconclusive"
    return Claim(cid, CLAIMS[cid], verdict, why, by_source)


def check_claims(ops: Mapping[str, str], layer_sources: Sequence[LayerSource],
                 method_sources: Sequence[MethodSource] = (), blocks: Mapping[str, object] | None = None) -> list[Claim]:
    """Every claim of :data:`CLAIMS` against the evidence. ``ops``: layer key -> DAG op label (canonical keys,
    as the sources name them); ``blocks``: layer key -> block (pairs SA-Q with SA-K)."""
    blocks = blocks or {}
    kind = backbone_kind(ops)
    claims = [
        _claim("t_embed", [(s, _group_sensitive(s, ops, ("t-Embed",), "t-Embed")) for s in layer_sources]),
        _claim("c_embed", [(s, _group_difference(s, ops, TIME_OPS, COND_OPS, "time-embedding layers",
                                                 "condition-embedding layers")) for s in layer_sources]),
    ]
    if kind == "other":
        claims.append(Claim("methods", CLAIMS["methods"], NOT_APPLICABLE,
                            "the backbone is neither a U-Net nor a transformer (from the DAG's ops)"))
    else:
        expected = "uniform" if kind == "U-Net" else "cluster"
        c = _claim("methods", [(s, _method_preference(s, expected)) for s in method_sources])
        c.summary = f"{kind} backbone (from the DAG's ops): the paper expects {expected} quantizers; {c.summary}"
        claims.append(c)
    claims.append(_claim("resblocks", [(s, _group_difference(s, ops, lambda o: o.startswith(RES_PREFIX),
                                                             TRANSFORMER_OPS, "ResNet-block layers",
                                                             "transformer-block layers")) for s in layer_sources]))
    claims.append(_claim("out_head", [(s, _group_sensitive(s, ops, OUT_OPS, "output head")) for s in layer_sources]))
    claims.append(_claim("sa_q_k", [(s, _paired(s, ops, blocks, "SA-Q", "SA-K")) for s in layer_sources]))
    return claims


def sensitive_parts(ops: Mapping[str, str], blocks: Mapping[str, object], sources: Sequence[LayerSource],
                    top: int = 5) -> dict:
    """Per source: the most sensitive layers, op types and blocks by mean percentile (most sensitive first)."""
    out = {}
    for s in sources:
        pct = percentiles(s.values)
        ranks = _ranks(s.values)
        by_op: dict = {}
        by_block: dict = {}
        for k, p in pct.items():
            by_op.setdefault(ops.get(k, "?"), []).append(p)
            by_block.setdefault(str(blocks.get(k, "?")), []).append(p)
        order = lambda d: sorted(({"name": n, "mean_percentile": float(np.mean(v)), "layers": len(v)}  # noqa: E731
                                  for n, v in d.items()), key=lambda r: -r["mean_percentile"])
        out[s.name] = {"layers": [{"layer": k, "rank": ranks[k], "value": float(s.values[k]), "op": ops.get(k, "?")}
                                  for k in sorted(ranks, key=ranks.get)[:top]],
                       "ops": order(by_op), "blocks": order(by_block), "unit": s.unit, "primary": s.primary,
                       "validation": s.validation}
    return out


def compare_testbeds(testbeds: Mapping[str, Mapping]) -> dict:
    """The paper's "the DiT output projection is more sensitive than the U-Net head", across testbeds.
    ``testbeds``: name -> ``{"backbone": kind, "claims": [claim dicts]}``; compares the output head's mean
    percentile per source kind present in both (the first source of each testbed whose name starts the same)."""
    def heads(entry):
        claim = next((c for c in entry["claims"] if c["id"] == "out_head"), None)
        if claim is None:
            return {}
        return {s["source"].split(" (")[0]: s["figures"].get("mean_percentile") for s in claim["by_source"]
                if s.get("primary") and s["figures"].get("mean_percentile") is not None}

    dits = {n: heads(e) for n, e in testbeds.items() if e.get("backbone") == "transformer"}
    unets = {n: heads(e) for n, e in testbeds.items() if e.get("backbone") == "U-Net"}
    if not dits or not unets:
        return {"claim": "The DiT output projection is more sensitive than the U-Net head.", "verdict": NOT_APPLICABLE,
                "summary": "needs a transformer and a U-Net testbed", "figures": {}}
    verdicts, lines, figures = [], [], {}
    for d, dh in dits.items():
        for u, uh in unets.items():
            for kind in sorted(set(dh) & set(uh)):
                diff = dh[kind] - uh[kind]
                verdicts.append(HOLDS if diff >= RULES["difference"] else FAILS if diff <= 0 else UNSURE)
                lines.append(f"{kind}: {d} head percentile {dh[kind]:.2f} vs {u} {uh[kind]:.2f} ({diff:+.2f})")
                figures[f"{kind}: {d} vs {u}"] = {"transformer": dh[kind], "unet": uh[kind], "difference": diff}
    return {"claim": "The DiT output projection is more sensitive than the U-Net head.",
            "verdict": combine(verdicts) if verdicts else NOT_APPLICABLE,
            "summary": "; ".join(lines) or "no evidence kind shared by both testbeds", "figures": figures}
