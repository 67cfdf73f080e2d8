"""The folder layout is the architecture: packaging lists every package, the torch-free
services stay torch-free, and `alignedserve.operator` never shadows the stdlib `operator`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]

# Packages whose every module must import without torch (or triton): the services that run
# without a GPU. The brief names these common modules; new ones are found on disk.
TORCH_FREE_PACKAGES = (
    "alignedserve.common",
    "alignedserve.router",
    "alignedserve.batcher",
    "alignedserve.operator",
    "alignedserve.bench",
)
REQUIRED_COMMON = ("model_config", "kv_layout", "block_allocator", "sampling_params")
REQUIRED_COMMON += ("tokenizer", "errors")
HEAVY = ("torch", "triton")


def python(
    code: str, *flags: str, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *flags, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **env},
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# ---- packaging ----------------------------------------------------------------------------


def package_dirs_on_disk() -> dict[str, Path]:
    """Every directory holding an __init__.py under a package-dir root, named as setuptools
    names it: the mapped package of the deepest root that contains it, plus the subpath."""
    roots = sorted(PACKAGE_DIR.items(), key=lambda kv: -len(Path(kv[1]).parts))
    found: dict[str, Path] = {}
    for _, rel_root in roots:
        for init in sorted((ROOT / rel_root).rglob("__init__.py")):
            d = init.parent
            pkg, base = next(
                (p, ROOT / r) for p, r in roots if d == ROOT / r or (ROOT / r) in d.parents
            )
            name = ".".join([pkg, *d.relative_to(base).parts])
            assert found.get(name, d) == d, f"{name} maps to both {found[name]} and {d}"
            found[name] = d
    return found


def test_package_list_matches_the_directories():
    on_disk = package_dirs_on_disk()
    listed = SETUPTOOLS["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    missing = sorted(set(on_disk) - set(listed))
    assert not missing, f"in the tree but not in [tool.setuptools].packages: {missing}"
    stale = sorted(set(listed) - set(on_disk))
    assert not stale, f"listed in [tool.setuptools].packages but not a package dir: {stale}"


def test_package_dir_roots_are_packages():
    assert PACKAGE_DIR.get("alignedserve") == "services"
    on_disk = package_dirs_on_disk()
    for pkg, rel in PACKAGE_DIR.items():
        assert (ROOT / rel / "__init__.py").is_file(), f"{pkg} -> {rel} has no __init__.py"
        assert on_disk[pkg] == ROOT / rel
    assert on_disk["alignedserve.worker.models"] == ROOT / "services" / "worker" / "models"


def test_every_directory_with_modules_is_a_package():
    """A subfolder of .py files without __init__.py would be left out of the wheel."""
    for rel_root in PACKAGE_DIR.values():
        for py in (ROOT / rel_root).rglob("*.py"):
            d = py.parent
            if any(part.startswith((".", "__pycache__")) for part in d.relative_to(ROOT).parts):
                continue
            assert (d / "__init__.py").is_file(), f"{d.relative_to(ROOT)} has no __init__.py"


def test_installed_package_resolves_to_this_tree():
    import alignedserve
    import alignedserve.operator

    for module in (alignedserve, alignedserve.operator):
        expected = ROOT / PACKAGE_DIR[module.__name__] / "__init__.py"
        assert Path(module.__file__).resolve() == expected, "stale editable install?"


# ---- torch-free imports --------------------------------------------------------------------


def modules_on_disk(package: str) -> list[str]:
    """The package and every module and subpackage below it, from the source tree."""
    base = package_dirs_on_disk()[package]
    names = []
    for py in sorted(base.rglob("*.py")):
        parts = py.relative_to(base).with_suffix("").parts
        if "__pycache__" in parts:
            continue
        names.append(".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)]))
    return sorted(names)


def test_torch_free_packages_cover_the_common_modules():
    found = modules_on_disk("alignedserve.common")
    for name in REQUIRED_COMMON:
        assert f"alignedserve.common.{name}" in found


IMPORT_EACH = """
    import importlib, sys
    offenders, seen = {}, set()
    for name in MODULES:
        importlib.import_module(name)
        heavy = [m for m in HEAVY if m in sys.modules and m not in seen]
        if heavy:  # the first module that pulled each one in
            offenders[name] = heavy
            seen.update(heavy)
    print(offenders)
"""


@pytest.mark.parametrize(
    "modules",
    [
        *([p, *modules_on_disk(p)] for p in TORCH_FREE_PACKAGES),
        ["alignedserve", "alignedserve.cli"],
    ],
    ids=[*TORCH_FREE_PACKAGES, "alignedserve.cli"],
)
def test_import_leaves_torch_out(modules, tmp_path):
    """Imports every module in a fresh interpreter; names the first one that pulls torch in."""
    code = f"MODULES = {modules!r}\nHEAVY = {HEAVY!r}\n" + textwrap.dedent(IMPORT_EACH)
    proc = python(code, cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.strip() == "{}", f"module -> heavy imports it caused: {proc.stdout}"


def test_python_m_alignedserve_help_exits_0(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alignedserve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("usage: alignedserve")
    for command in ("model", "generate"):
        assert command in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["generate", "--help"], ["model", "--help"], ["model", "init-tiny", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_imports_no_torch(argv, tmp_path):
    proc = python(
        f"""
        import sys
        from alignedserve.cli import build_parser
        try:
            build_parser().parse_args({argv!r})
        except SystemExit as e:
            assert e.code == 0, e.code
        else:
            raise AssertionError("--help did not exit")
        assert "torch" not in sys.modules, "--help imported torch"
        assert "triton" not in sys.modules, "--help imported triton"
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("usage: alignedserve")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"]], ids=["--help", "generate"])
def test_main_module_help_imports_no_torch(argv, tmp_path):
    """The whole `python -m alignedserve` path (__main__ + cli.main), not just the parser."""
    proc = python(
        f"""
        import runpy, sys
        sys.argv = ["alignedserve", *{argv!r}]
        try:
            runpy.run_module("alignedserve", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code == 0, e.code
        else:
            raise AssertionError("--help did not exit")
        assert "torch" not in sys.modules, "python -m alignedserve --help imported torch"
        """,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, explain(proc)
    assert "usage: alignedserve" in proc.stdout


# ---- the stdlib `operator` ------------------------------------------------------------------

STDLIB_OPERATOR_CHECK = f"""
    import operator, sys
    import alignedserve.operator as ours
    import operator as again
    assert operator is again is sys.modules["operator"]
    assert operator.add(1, 2) == 3 and operator.itemgetter(1)("ab") == "b"
    assert not operator.__file__.startswith({str(ROOT)!r}), operator.__file__
    assert ours is not operator and ours.__name__ == "alignedserve.operator"
    assert ours.__file__.startswith({str(ROOT / PACKAGE_DIR["alignedserve.operator"])!r})
    import collections, functools  # stdlib users of operator still work
    assert functools.reduce(operator.mul, [2, 3, 4]) == 24
    print("ok")
"""


@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_alignedserve_operator_does_not_shadow_stdlib_operator(where, tmp_path):
    # from the repo root, "" (the cwd) is first on sys.path: the worst case for shadowing
    proc = python(STDLIB_OPERATOR_CHECK, cwd=ROOT if where == "repo-root" else tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", explain(proc)


def test_stdlib_operator_in_this_process():
    import operator

    import alignedserve.operator

    assert operator.add(1, 2) == 3
    assert ROOT not in Path(operator.__file__).resolve().parents
    assert alignedserve.operator is not operator


def test_repo_root_on_pythonpath_keeps_stdlib_operator(tmp_path):
    """`PYTHONPATH=.`: the repo root comes before the stdlib, before site.py imports operator."""
    proc = python(STDLIB_OPERATOR_CHECK, cwd=tmp_path, PYTHONPATH=str(ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", explain(proc)


def test_no_site_in_repo_root_keeps_stdlib_operator():
    """`python -S` in the repo root: nothing imported operator before "" (the cwd) is searched."""
    proc = python(
        f"""
        import operator, collections
        assert operator.add(1, 2) == 3
        assert not operator.__file__.startswith({str(ROOT)!r}), operator.__file__
        print("ok")
        """,
        "-S",
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", explain(proc)
