"""Tools run with the repo root on sys.path (`python -m pip` in a fresh clone, `python -c`), so
no top-level entry may share a name with a standard-library module: a top-level `operator/`
package once broke `python -m pip` in CI before anything was installed."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_entry_shadows_the_standard_library():
    importable = {
        p.stem if p.suffix == ".py" else p.name
        for p in ROOT.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    # a folder without __init__.py (operator/) loses to a regular stdlib module, so it is fine
    assert importable.isdisjoint(sys.stdlib_module_names), importable & sys.stdlib_module_names


def test_python_started_in_repo_root_gets_stdlib_operator():
    out = subprocess.run(
        [sys.executable, "-c", "import operator, collections; print(operator.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert not out.strip().startswith(str(ROOT))
