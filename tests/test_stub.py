"""The stub python/lora_da/_core.pyi against the compiled extension.

mypy's stubtest imports `lora_da._core` and compares every public name,
signature and default value with the stub: a binding change that the stub
does not follow (or the reverse) fails here instead of in a user's type
checker. No difference is allowed (no allowlist).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_da._core

pytest.importorskip("mypy.stubtest")


def test_stub_matches_compiled_module(tmp_path):
    package_root = Path(lora_da._core.__file__).resolve().parent.parent
    # mypy reads the stub from a folder of its own, beside an empty package stub: given the
    # package itself it analyses lora_da/__init__.py and everything that imports (torch), which
    # took 90 of CI's 450 s of tests; the runtime side still imports the real package.
    stubs = tmp_path / "stubs" / "lora_da"
    stubs.mkdir(parents=True)
    shutil.copy(package_root / "lora_da" / "_core.pyi", stubs / "_core.pyi")
    (stubs / "__init__.pyi").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), os.environ.get("PYTHONPATH", "")]),
               MYPYPATH=str(stubs.parent))
    cmd = [sys.executable, "-m", "mypy.stubtest", "lora_da._core"]
    # its own cache directory, so that parallel runs and read-only checkouts work
    env["MYPY_CACHE_DIR"] = str(tmp_path / "mypy_cache")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def test_solve_defaults_are_the_signature_defaults():
    # the binding writes its signatures from the same list (rust/src/options.rs `solve_defaults!`)
    import inspect

    for fn in (lora_da._core.solve, lora_da._core.solve_shared, lora_da._core.check_solve_options):
        params = inspect.signature(fn).parameters
        for name, value in lora_da._core.SOLVE_DEFAULTS.items():
            assert params[name].default == value, (fn.__name__, name)
