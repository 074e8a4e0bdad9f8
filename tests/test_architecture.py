"""The import rules of docs/architecture.md: bonbench stands alone, distill never needs evals, and
the math modules import nothing that can do I/O. Read from the source with ``ast``, so an import
inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH_MODULES = ("bonbench/bon.py", "distill/losses.py", "distill/testbed.py")
# Numerical libraries and the standard library's pure helpers; nothing that opens files or sockets.
MATH_MAY_IMPORT = {
    "__future__", "collections", "copy", "dataclasses", "functools", "itertools", "math", "types", "typing",
    "numpy", "scipy", "torch", "bonbench.bon", "distill.losses",
}


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, absolute, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import stays inside its own package
                package = ".".join(path.relative_to(root).with_suffix("").parts[: -node.level])
                names.add(f"{package}.{node.module}" if node.module else package)
            else:
                names.add(node.module)
    return names


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _sources(package: str) -> list[Path]:
    folder = ROOT / package
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


@pytest.mark.parametrize("package, forbidden", [("bonbench", ("distill", "evals")), ("distill", ("evals",))])
def test_a_package_does_not_import_the_packages_built_on_it(package, forbidden):
    files = _sources(package)
    assert files, f"no sources under {package}/"
    offending = sorted(
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if any(_in(module, other) for other in forbidden)
    )
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_modules_import_only_numerical_libraries(module):
    imports = imported_modules(ROOT / module)
    allowed = [name for name in imports if any(_in(name, ok) for ok in MATH_MAY_IMPORT)]
    assert allowed, f"found no imports in {module}: the check would be vacuous"
    assert set(allowed) == imports, f"{module} imports {sorted(imports - set(allowed))}"


def test_the_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "pkg" / "sub"
    package.mkdir(parents=True)
    source = package / "mod.py"
    source.write_text("import os\n\n\ndef f():\n    from distill import loop\n    from . import sibling\n")
    assert imported_modules(source, root=tmp_path) == {"os", "distill", "pkg.sub"}
