"""Declared dependencies match what the installed loraserve package imports.

Every .py module of the installed package (each package listed in pyproject's
[tool.setuptools] packages, found through the import system, so an editable and a wheel install
are both checked) is parsed, and every absolute import in it, at module level or inside a function
or class, is mapped from its top-level name to the distribution providing it
(importlib.metadata.packages_distributions()). Names in sys.stdlib_module_names and loraserve
itself are skipped; relative imports are loraserve's own.

The rule:
- an import that runs unconditionally must come from a distribution in [project].dependencies:
  an install without extras has to be able to run it;
- an import in the body of a `try:` with a handler that catches ImportError (`except ImportError`,
  `ModuleNotFoundError`, `Exception`, `BaseException` or a bare `except`) is optional: the code
  has a fallback, so a distribution in the `test` extra is accepted too (e.g. triton, which the
  LoRA kernels use when it is importable);
- so is every import of a module listed in OPTIONAL_MODULES, modules that loraserve imports only
  after such a guarded check (each entry names the check).
A distribution may satisfy an import only by being declared, never by being pulled in by another
one: transitive dependencies change under us between releases.

Also: build-time tools (grpcio-tools) are not runtime dependencies; the installed layout has one
top-level package, loraserve (no `server` or `trainer`); requirements.lock pins every declared
dependency inside its range, was made by the command README.md documents, and is what is installed.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TIME_ONLY = {"grpcio-tools"}  # protoc for clients/generate.py; never needed to serve
OPTIONAL_MODULES = {
    "loraserve.server.lora.triton_ops": "imported by server/lora/ops.py only when triton_available()",
}
CATCHES_IMPORT_ERROR = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


RUNTIME = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
TEST_EXTRA = {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["test"]}


@dataclass(frozen=True)
class Import:
    module: str  # the loraserve module that imports
    name: str  # the imported (dotted) name as written
    line: int
    optional: bool  # inside `try: ... except ImportError`

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: import {self.name}"


def catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in CATCHES_IMPORT_ERROR for k in kinds)


def imports_of(module: str, source: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, optional: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(module, a.name, node.lineno, optional) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.append(Import(module, node.module, node.lineno, optional))
        if isinstance(node, ast.Try) and any(catches_import_error(h) for h in node.handlers):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, optional)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, optional)

    visit(ast.parse(source), module in OPTIONAL_MODULES)
    return found


def installed_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, found through the import system."""
    packages = PYPROJECT["tool"]["setuptools"]["packages"]
    modules: dict[str, Path] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
        for location in map(Path, spec.submodule_search_locations):
            for path in sorted(location.glob("*.py")):
                name = package if path.stem == "__init__" else f"{package}.{path.stem}"
                modules[name] = path
            unlisted = sorted(f"{package}.{d.name}" for d in location.iterdir()
                              if (d / "__init__.py").is_file() and f"{package}.{d.name}" not in packages)
            assert not unlisted, f"packages missing from pyproject's [tool.setuptools] packages: {unlisted}"
    return modules


def test_walk_finds_the_whole_package():
    modules = installed_modules()
    for expected in ["loraserve.client", "loraserve.v1.inference_pb2", "loraserve.core.lora.layer",
                     "loraserve.server.app", "loraserve.server.cli", "loraserve.trainer.render"]:
        assert expected in modules


def test_every_import_is_declared():
    providers = md.packages_distributions()
    problems = []
    for module, path in sorted(installed_modules().items()):
        for imp in imports_of(module, path.read_text()):
            top = imp.name.split(".")[0]
            if top in sys.stdlib_module_names or top == "loraserve":
                continue
            dists = sorted({normalize(d) for d in providers.get(top, [])})
            allowed = RUNTIME | TEST_EXTRA if imp.optional else RUNTIME
            if not dists:
                problems.append(f"{imp}: no installed distribution provides {top!r}")
            elif not allowed & set(dists):
                where = "[project].dependencies or the test extra" if imp.optional else "[project].dependencies"
                problems.append(f"{imp}: {' or '.join(dists)} is not declared in {where}")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_rule_sees_guards_and_function_level_imports():
    source = (
        "import os\n"
        "from torch import nn\n"
        "try:\n    import triton\nexcept ImportError:\n    triton = None\n"
        "def f():\n    import numpy\n"
        "try:\n    import yaml\nexcept ValueError:\n    pass\n"
        "try:\n    import regex\nexcept (OSError, Exception):\n    pass\nelse:\n    import tqdm\n"
        "from . import sibling\n"
    )
    found = {(i.name, i.optional) for i in imports_of("m", source)}
    assert found == {("os", False), ("torch", False), ("triton", True), ("numpy", False), ("yaml", False),
                     ("regex", True), ("tqdm", False)}
    assert all(i.optional for i in imports_of(next(iter(OPTIONAL_MODULES)), source))


def test_build_time_tools_are_not_runtime_dependencies():
    assert not RUNTIME & BUILD_TIME_ONLY, f"build-time only, move to the test extra: {RUNTIME & BUILD_TIME_ONLY}"
    assert BUILD_TIME_ONLY <= TEST_EXTRA, "clients/generate.py and tests/test_proto.py need grpcio-tools"
    installed = md.distribution("loraserve").metadata.get_all("Requires-Dist") or []
    unconditional = {requirement_name(r) for r in installed if "extra ==" not in r}
    assert not unconditional & BUILD_TIME_ONLY, "the installed metadata is stale: reinstall (deploy/install.sh)"


def test_installed_layout_has_no_top_level_server_or_trainer(tmp_path):
    # Outside the repo root, so the checkout's folders are not on sys.path: only what pip installed.
    code = (
        "import importlib.util as u, json\n"
        "print(json.dumps({n: u.find_spec(n) is not None for n in "
        "['server', 'trainer', 'core', 'clients', 'loraserve', 'loraserve.server', 'loraserve.trainer']}))"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True).stdout
    found = json.loads(out)
    assert found == {"server": False, "trainer": False, "core": False, "clients": False,
                     "loraserve": True, "loraserve.server": True, "loraserve.trainer": True}, found


LOCK = ROOT / "requirements.lock"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and ";" not in version, f"requirements.lock: not a plain pin: {line!r}"
            pins[normalize(name)] = version.strip()
    return pins


def test_lock_pins_every_declared_dependency_within_its_range():
    from packaging.requirements import Requirement

    pins = lock_pins()
    assert pins.get("torch") == "2.13.0", "torch is held at 2.13.0 ([tool.uv] constraint-dependencies)"
    stale = []
    for spec in [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        pin = pins.get(normalize(req.name))
        if pin is None or not req.specifier.contains(pin, prereleases=True):
            stale.append(f"{spec} (locked: {pin})")
    assert not stale, "requirements.lock is stale, refresh it (README.md, Development): " + ", ".join(stale)


def test_readme_documents_the_command_that_made_the_lock():
    header = LOCK.read_text().splitlines()[:2]
    assert header[0] == "# This file was autogenerated by uv via the following command:", header
    command = header[1].lstrip("# ").strip()
    assert command.startswith("uv pip compile pyproject.toml") and command in (ROOT / "README.md").read_text()


def test_installed_versions_are_the_locked_ones():
    mismatched = []
    for name, pin in lock_pins().items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # pinned for another machine (e.g. the CUDA packages) or an extra not installed
        if installed.split("+")[0] != pin:  # torch 2.13.0+cpu is the CPU build of the pinned 2.13.0
            mismatched.append(f"{name} {installed} (locked {pin})")
    assert not mismatched, "not installed from the lock (bash deploy/install.sh): " + ", ".join(mismatched)
