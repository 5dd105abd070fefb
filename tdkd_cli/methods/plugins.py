"""Plug-ins: methods registered by the user's code (``register_method``) or offered by installed
packages (the entry-point group ``tdkd.methods``), imported from ``--plugin``, ``$TDKD_PLUGINS`` or
the entry points (``load_plugins``). A registered method is a ``registry.Method`` like the built-in
ones: recipes and ``--method`` name it, ``tdkd methods`` lists it (``list_methods``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from .registry import BUILTIN, FEATURE_PATHS, METHODS, Method, apply_connector, catalogue, linear_connector
from ..core.errors import UsageError

PLUGIN_GROUP = "tdkd.methods"  # entry-point group of installed packages that offer methods
PLUGINS_ENV = "TDKD_PLUGINS"  # more modules or .py files to import, separated by os.pathsep
_KINDS = ("response", "feature", "relation")
_loaded: set[str] = set()


def register_method(name: str, *, kind: str = "response", paper: str = "user-registered method",
                    options: dict | None = None, families: str = "text, ViT, CNN", replace: bool = False):
    """Decorator: register a loss function as a method that recipes and ``--method`` name.

    ``kind="response"``: ``fn(student_logits, teacher_logits, **options) -> scalar``.
    ``kind="feature"`` or ``"relation"``: ``fn(student_feature, teacher_feature, **options)``, the
    outputs of the modules a spec names with ``student=PATH,teacher=PATH`` (a student feature of
    another width is first projected by a learned connector, as FitNets' is). ``options``: name ->
    default number, or (default, help); every method also takes ``weight``."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name or ""):
        raise UsageError(f"register_method: name {name!r} must be lower-case letters, digits, '-' or '_'")
    if kind not in _KINDS:
        raise UsageError(f"register_method {name}: kind must be one of {', '.join(_KINDS)} (got {kind!r})")
    taken = name in {b[0] for b in BUILTIN} or (name in METHODS and not replace)
    if taken:
        raise UsageError(f"register_method: {name!r} is already a method; choose another name (or replace=True for your own)")
    opts = {}
    for key, value in (options or {}).items():
        default, text = value if isinstance(value, tuple) else (value, "")
        if key in ("weight", "student", "teacher") or not isinstance(default, (int, float)):
            raise UsageError(f"register_method {name}: option {key!r} must be a number other than weight/student/teacher")
        opts[key] = (float(default), text)

    def decorate(fn: Callable) -> Callable:
        keys = list(opts)
        if kind == "response":
            compute = lambda s, t, batch, o: fn(s.logits, t.logits, **{k: o[k] for k in keys})  # noqa: E731
            method = Method(name, kind, paper, dict(opts), compute, families)
        else:
            def compute(sf, tf, batch, o, conn):
                s = sf[0] if conn is None else apply_connector(conn, sf[0])
                return fn(s, tf[0], **{k: o[k] for k in keys})
            method = Method(name, kind, paper, {**FEATURE_PATHS, **opts}, compute, families, features=True,
                            connector=linear_connector)
        METHODS[name] = method
        return fn

    return decorate


def load_plugins(extra: Sequence[str] = ()) -> int:
    """Import the plug-ins not imported yet: the entry points of group ``tdkd.methods`` (installed
    packages), the modules or ``.py`` files in $TDKD_PLUGINS and ``extra`` (``--plugin``).
    Importing one registers its methods (``register_method``). Returns how many were imported."""
    from importlib import metadata

    count = 0
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        if f"ep:{ep.value}" not in _loaded:
            _loaded.add(f"ep:{ep.value}")
            _import(ep.value, lambda ep=ep: ep.load())
            count += 1
    env = [x for x in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if x.strip()]
    for target in [*env, *extra]:
        if target not in _loaded:
            _loaded.add(target)
            _import(target, lambda target=target: _import_target(target))
            count += 1
    return count


def _import_target(target: str):
    if target.endswith(".py") or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"plug-in {target}: no such file")
        spec = importlib.util.spec_from_file_location(f"tdkd_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(target)


def _import(name: str, load: Callable) -> None:
    try:
        load()
    except UsageError:
        raise
    except Exception as exc:  # a plug-in's own failure: one line naming it, not a traceback
        raise UsageError(f"plug-in {name} failed to import: {type(exc).__name__}: {exc}") from None


def list_methods() -> list[dict]:
    """Every loss a recipe can use (``tdkd methods --json``): built-in terms, methods, plug-ins."""
    load_plugins()
    return catalogue()


