"""The checkout's kernels/ folder never stands in for the Hugging Face `kernels` package.

`python -m pytest` (the README's test command) puts the checkout's root first on sys.path, where kernels/ is
found as top-level `kernels`; transformers >= 5.25 depends on that package and imports it as soon as pyvene or
modeling_utils loads, so a shadowing folder broke the whole suite on a fresh install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python_in_root(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_top_level_kernels_from_the_checkout_root_is_the_installed_package_not_this_folder(tmp_path):
    installed = tmp_path / "site" / "kernels"  # stands for the HF package, on sys.path after the root ("")
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("WHO = 'installed'\n")
    (installed / "layer.py").write_text("WHAT = 'a submodule of it'\n")
    code = "import sys; assert sys.path[0] == ''; import kernels, kernels.layer; print(kernels.WHO, kernels.layer.WHAT)"
    done = _python_in_root(code, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "installed a submodule of it"


def test_top_level_kernels_is_missing_from_the_checkout_root_when_nothing_installs_it():
    code = (
        "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
        "    print('missing', e.name, 'kernels' in sys.modules)\nelse:\n    print('found', kernels.__file__)"
    )
    done = _python_in_root(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "missing kernels False"


def test_the_fused_modules_still_import_as_hyperdas_kernels():
    done = _python_in_root("import hyperdas.kernels as k; print(k.Interchange.__name__, k.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Interchange hyperdas.kernels"
