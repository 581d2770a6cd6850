"""A point's identity: which row it is (``point_key``) and whether a row already on disk is still current.

The key is the layer (and its compiled form), the whole problem and the environment that affects
timing: rows of the same key replace each other. A row is current when, in addition, the layer's code version and the measurement
settings that change a number are those of this run; a resumed sweep measures every point whose row
is not current again.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import sys
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qna_bench.labels import EAGER, SHIPPED, TUNED, is_compiled
from qna_bench.problem import Problem

if TYPE_CHECKING:
    from qna_bench.environment import Environment

# Libraries a layer may wrap: their versions are part of its code version.
WRAPPED_LIBRARIES = ("torch", "timm", "natten")
# Harness modules every layer imports: an edit there is not an edit of one layer.
HARNESS_MODULES = frozenset({"qna_bench.registry", "qna_bench.problem"})
# Harness subpackages: a layer brings the modules of theirs it imports, not the whole package.
HARNESS_PACKAGES = frozenset({"qna_bench.measure"})
# Environment fields that change a timing (the others, e.g. hostname, only describe the run).
ENVIRONMENT_KEY_FIELDS = ("device_name", "torch_version")
# Settings a row's numbers do not depend on, so they do not make a row stale. A `timeout` or `skipped`
# row is stale after all when the budget grew (see `is_current`).
SETTINGS_NOT_IN_VERSION = frozenset({"point_budget_s", "profile_dir", "probes", "fresh_processes", "canary",
                                     "slow_canary_share", "threads_note"})
# Statuses whose row a larger budget may turn into a measurement.
BUDGET_STATUSES = ("timeout", "skipped")


def problem_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Problem))


def point_key(values: dict[str, Any]) -> str:
    """A stable id of a point from a row's columns: layer, every `Problem` field, environment, threads,
    the compile mode when the layer ran compiled, and `shipped` for a layer measured as built (an eager,
    tuned row keeps the key it had before those columns)."""
    columns = ("layer", *problem_fields(), *ENVIRONMENT_KEY_FIELDS, "threads")
    parts = [values.get(c) for c in columns]
    if is_compiled(values.get("compile_mode")):
        parts.append(values["compile_mode"])
    if values.get("tuning") == SHIPPED:
        parts.append(SHIPPED)
    identity = json.dumps(parts, default=str)
    return hashlib.sha1(identity.encode()).hexdigest()[:16]


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(str(Path(paths[name]).resolve()) for name in ("stdlib", "platstdlib", "purelib", "platlib"))


def _is_project_module(name: str) -> bool:
    """A module whose source is ours or a plugin's: not the standard library or an installed package."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = str(Path(file).resolve())
    return not any(path.startswith(root) for root in _library_roots())


def _modules_used(module: Any) -> set[str]:
    """Names of the modules whose objects ``module`` holds (its imports, direct and `from ... import`)."""
    names = set()
    for value in vars(module).values():
        name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(name, str):
            names.add(name)
    return names


def _subpackage(name: str) -> str | None:
    """The package holding module ``name`` when that is a subpackage (``qna_bench.qna`` for
    ``qna_bench.qna.core``), not a top-level one such as ``qna_bench`` or ``baselines``."""
    parent = name.rpartition(".")[0]
    if "." not in parent or parent in HARNESS_PACKAGES or parent not in sys.modules:
        return None
    return parent


def _package_sources(name: str, module: Any) -> dict[str, bytes]:
    """Every source file of package ``name``'s folder, its subfolders included, keyed by path."""
    folder = Path(module.__file__).parent
    return {f"{name}/{path.relative_to(folder)}": path.read_bytes() for path in sorted(folder.rglob("*.py"))}


@functools.cache
def module_code_version(module_name: str) -> str:
    """A hash of the source of ``module_name`` and of the project modules it imports, transitively (not
    the harness), plus the versions of the wrapped libraries any of them imports. A module of a
    subpackage (the QnA layer's ``qna_bench.qna``) brings every file of that package."""
    sources: dict[str, bytes] = {}
    libraries: set[str] = set()
    pending = [module_name]
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        module = sys.modules[name]
        sources[name] = Path(module.__file__).read_bytes()
        if hasattr(module, "__path__") and "." in name:
            sources.update(_package_sources(name, module))
        package = _subpackage(name)
        if package is not None and package not in sources and _is_project_module(package):
            pending.append(package)
        for used in _modules_used(module):
            root = used.split(".")[0]
            if root in WRAPPED_LIBRARIES:
                libraries.add(root)
            elif used not in HARNESS_MODULES and used not in sources and _is_project_module(used):
                pending.append(used)
    digest = hashlib.sha1()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name] + b"\0")
    versions = " ".join(f"{lib}={_version(lib)}" for lib in sorted(libraries))
    return f"{digest.hexdigest()[:12]} {versions}".strip()


def _version(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def settings_record(settings: Any) -> str:
    """The measurement settings as sorted JSON, as recorded in each row's ``measure_settings``."""
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def point_identity(
    layer: Any, problem: Problem, env: Environment, settings: Any, compile_mode: str = EAGER, tuning: str = TUNED
) -> dict[str, Any]:
    """The identity columns of a row: the problem, environment, threads, compile mode, tuning (the tuned
    form or as shipped), code version, settings and key."""
    values = dict(
        layer=layer.name,
        compile_mode=compile_mode,
        tuning=tuning,
        threads=settings.threads,
        **problem.as_dict(),
        **env.as_dict(),
        code_version=module_code_version(layer.factory.__module__),
        measure_settings=settings_record(settings),
    )
    values["point_key"] = point_key(values)
    return values


def _version_part(record: str | None) -> dict[str, Any] | None:
    if not record:
        return None
    return {k: v for k, v in json.loads(record).items() if k not in SETTINGS_NOT_IN_VERSION}


def is_current(row: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether ``row`` (from disk) still stands for the point ``identity`` describes.

    Stale: another code version of the layer, other settings that change a number, or a `timeout` or
    `skipped` row recorded under a smaller ``point_budget_s`` than this run's.
    """
    if row.get("code_version") != identity["code_version"]:
        return False
    if _version_part(row.get("measure_settings")) != _version_part(identity["measure_settings"]):
        return False
    if row.get("status") in BUDGET_STATUSES:
        old = json.loads(row["measure_settings"]).get("point_budget_s")
        new = json.loads(identity["measure_settings"]).get("point_budget_s")
        return old is None or (new is not None and new <= old)
    return True
