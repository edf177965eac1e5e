"""What each generated image is conditioned on: COCO captions, PartiPrompts or class labels.

The reference protocol (FID-GT-1k) uses the first 1,000 *annotation entries in file order* of COCO 2017
``captions_val2017.json``: 1,000 captions, not 1,000 distinct images. Class-conditional families use one
image per class, cycling through the classes (image ``i`` gets class ``i % num_classes``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ...errors import InputError
from ...families import FamilySpec, get_family

COCO_FIX = ("Fix: download the COCO 2017 annotations (annotations_trainval2017.zip) and point to "
            "captions_val2017.json with QUA2SEDIMO_COCO_CAPTIONS=/path/to/captions_val2017.json or --coco_path PATH.")
PARTI_FIX = ("Fix: download PartiPrompts.tsv (google-research/parti) and point to it with "
             "QUA2SEDIMO_PARTI_PROMPTS=/path/to/PartiPrompts.tsv or --parti_path PATH.")


def _family(family: str | FamilySpec) -> FamilySpec:
    return family if isinstance(family, FamilySpec) else get_family(family)


def _resolve(path, default_attr: str) -> Path | None:
    if path is not None:
        return Path(path).expanduser()
    from multiquant.paths import constants

    return getattr(constants, default_attr)


def coco_prompts(n: int = 1000, path: str | Path | None = None) -> list[str]:
    """The first ``n`` captions of COCO 2017 val, in annotation-file order (the reference protocol).

    Captions are returned verbatim (no stripping), exactly as the reference passed them to the pipelines."""
    path = _resolve(path, "COCO_2017_PROMPTS")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"COCO captions file not found: {path}. {COCO_FIX}")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    try:
        annotations = data["annotations"]
    except (KeyError, TypeError):
        raise InputError(f"{path} has no 'annotations' list: is it a COCO captions file? {COCO_FIX}") from None
    if n > len(annotations):
        raise InputError(f"asked for {n} COCO prompts but {path} holds only {len(annotations)} captions")
    return [entry["caption"] for entry in annotations[:n]]


def parti_prompts(n: int | None = None, path: str | Path | None = None, category: str | None = None) -> list[str]:
    """PartiPrompts in file order, optionally one category only (e.g. ``"Animals"``)."""
    path = _resolve(path, "PARTI_PROMPTS")
    if path is None or not path.is_file():
        raise FileNotFoundError(f"PartiPrompts file not found: {path}. {PARTI_FIX}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "Prompt" not in rows[0]:
        raise InputError(f"{path} has no 'Prompt' column: is it PartiPrompts.tsv? {PARTI_FIX}")
    prompts = [row["Prompt"] for row in rows if category is None or row.get("Category") == category]
    if n is not None:
        if n > len(prompts):
            raise InputError(f"asked for {n} PartiPrompts but {path} holds only {len(prompts)}"
                             + (f" in category {category!r}" if category else ""))
        prompts = prompts[:n]
    return prompts


def class_labels(family: str | FamilySpec, n: int) -> list[int]:
    """Class ids for ``n`` images, cycling through the classes: ``[i % num_classes for i in range(n)]``.

    DiT with n=1000 gets one image per ImageNet class (0..999, the reference protocol); MNIST gets n/10
    images per digit, interleaved 0, 1, ..., 9, 0, 1, ... so that any prefix is class-balanced."""
    spec = _family(family)
    if spec.conditioning != "class":
        raise ValueError(f"family {spec.name!r} is conditioned on {spec.conditioning!r}, not on class labels")
    num_classes = spec.num_classes or {"imagenet_classes": 1000, "mnist_classes": 10}.get(spec.prompt_source)
    if not num_classes:
        raise ValueError(f"family {spec.name!r} does not say how many classes it has: set num_classes")
    return [i % num_classes for i in range(n)]


def conditions_for(family: str | FamilySpec, n: int, coco_path: str | Path | None = None) -> list:
    """The ``n`` conditions of the family's protocol: prompts for text families, class ids otherwise."""
    spec = _family(family)
    if spec.conditioning == "class":
        return class_labels(spec, n)
    if spec.prompt_source == "coco":
        return coco_prompts(n, coco_path)
    if spec.prompt_source == "parti":
        return parti_prompts(n)
    raise ValueError(f"family {spec.name!r} has an unknown prompt_source {spec.prompt_source!r} "
                     "(expected 'coco', 'parti', 'imagenet_classes' or 'mnist_classes')")
