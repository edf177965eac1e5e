"""Find a family from what a user typed: a registered name, ``pkg.module:ATTR``, ``path/to/file.py:ATTR``, or a
name published through the ``qua2sedimo.families`` entry-point group.

``ATTR`` is a :class:`FamilySpec` or a callable returning one. A family found this way is registered, so that
``get_family(spec.name)`` works afterwards everywhere.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import UserError

ENTRY_POINT_GROUP = "qua2sedimo.families"


class FamilyImportError(UserError):
    """A ``--family`` spec that cannot be imported or does not name a family."""


def _entry_point(name: str):
    from importlib.metadata import entry_points

    return next((ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name), None)


def _import_file(path: Path, text: str):
    if not path.is_file():
        raise FamilyImportError(f"--family {text}: no file {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    module_name = f"_qua2sedimo_family_{path.stem}_{digest}"
    if module_name in sys.modules:  # the same file twice in one process: one module, one registration
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise FamilyImportError(f"--family {text}: importing {path} failed: {type(err).__name__}: {err}") from err
    return module


def _import_module(name: str, text: str):
    try:
        return importlib.import_module(name)
    except Exception as err:  # ModuleNotFoundError, or the user's module raising while it is imported
        raise FamilyImportError(f"--family {text}: cannot import module {name!r}: {type(err).__name__}: {err} "
                                f"(is its folder on PYTHONPATH?)") from err


def _as_family(obj, text: str):
    from . import FamilySpec

    if not isinstance(obj, FamilySpec) and callable(obj):
        try:
            obj = obj()
        except Exception as err:
            raise FamilyImportError(f"--family {text}: calling it failed: {type(err).__name__}: {err}") from err
    if not isinstance(obj, FamilySpec):
        raise FamilyImportError(f"--family {text}: is a {type(obj).__name__}, not a FamilySpec (or a callable "
                                f"returning one)")
    return obj


def _family_attrs(module) -> list[str]:
    """Names of the module's attributes that hold a FamilySpec (what a user may have meant)."""
    from . import FamilySpec

    return sorted(name for name, value in vars(module).items() if isinstance(value, FamilySpec))


def _defines(names: list[str]) -> str:
    return f" (it defines {', '.join(names)})" if names else ""


def _register(spec, text: str | None = None):
    from . import _REGISTRY, _SPEC_TEXT, register_family

    if _REGISTRY.get(spec.name) is not spec:
        register_family(spec, overwrite=True)  # the user's own definition wins over an earlier one of that name
    if text is not None:  # how a later message tells the user to name it again (family_flag)
        _SPEC_TEXT[spec.name] = text
    return spec


def resolve_family(text: str):
    """The :class:`FamilySpec` that ``text`` names (see the module docstring), registered."""
    from . import _REGISTRY, list_families

    text = text.strip()
    if ":" not in text:  # a plain name
        if text in _REGISTRY:
            return _REGISTRY[text]
        if text.endswith(".py"):  # a file without the attribute that holds the family
            path = Path(text).expanduser()
            found = _family_attrs(_import_file(path, text))
            example = found[0] if found else "FAMILY"
            raise FamilyImportError(f"--family {text}: name the attribute that holds the family, as in "
                                    f"{text}:{example}" + _defines(found))
        entry = _entry_point(text)
        if entry is None:
            raise FamilyImportError(
                f"unknown model family {text!r}; known: {', '.join(list_families())}. Give your own as --family "
                f"pkg.module:ATTR or path/to/file.py:ATTR, or publish it in the {ENTRY_POINT_GROUP!r} entry-point group")
        try:
            obj = entry.load()
        except Exception as err:
            raise FamilyImportError(f"family {text!r} (entry point {entry.value}) failed to load: "
                                    f"{type(err).__name__}: {err}") from err
        return _register(_as_family(obj, text))
    where, attr = text.rsplit(":", 1)
    if not attr.isidentifier():
        raise FamilyImportError(f"--family {text}: expected pkg.module:ATTR or path/to/file.py:ATTR")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(Path(where).expanduser(), text) if is_file else _import_module(where, text)
    if not hasattr(module, attr):
        raise FamilyImportError(f"--family {text}: {where} has no attribute {attr!r}" + _defines(_family_attrs(module)))
    return _register(_as_family(getattr(module, attr), text), text)
