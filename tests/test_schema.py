"""The schema is a leaf: the registries check their settings without importing the config."""

from __future__ import annotations

import subprocess
import sys


def test_registries_do_not_import_the_config():
    code = ("import sys, mimkit.backbones, mimkit.methods, mimkit.schema; "
            "bad = [m for m in ('mimkit.config', 'mimkit.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_config_imports_no_model_code():
    code = ("import sys, mimkit.config; "
            "bad = sorted(m for m in sys.modules if m.startswith(('mimkit.models', 'mimkit.methods', "
            "'mimkit.backbones', 'mimkit.engine', 'torch'))); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_config_module_names_no_model_code_even_inside_functions():
    """A function-level import would hide the cycle from the test above; the source must not hold one."""
    import ast
    from pathlib import Path

    import mimkit.config

    tree = ast.parse(Path(mimkit.config.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    model_code = sorted(m for m in imported if m and m.startswith(("mimkit.models", "mimkit.methods",
                                                                   "mimkit.backbones", "mimkit.engine")))
    assert not model_code, f"mimkit/config.py imports {model_code}"


def test_no_import_cycle_whichever_module_comes_first():
    code = "import {}; import mimkit.models; mimkit.models.load_config()"
    # Side by side: the three interpreters share nothing.
    procs = [subprocess.Popen([sys.executable, "-c", code.format(first)])
             for first in ("mimkit.config", "mimkit.methods", "mimkit.engine.trainer")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]


def test_schema_imports_nothing_of_mimkit_but_errors():
    code = ("import sys, mimkit.schema; "
            "ours = sorted(m for m in sys.modules if m.startswith('mimkit.')); "
            "assert ours == ['mimkit.errors', 'mimkit.schema'], ours")
    subprocess.run([sys.executable, "-c", code], check=True)
