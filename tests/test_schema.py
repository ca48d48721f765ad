"""The schema is a leaf: the registries check their settings without importing the config."""

from __future__ import annotations

import subprocess
import sys


def test_registries_do_not_import_the_config():
    code = ("import sys, mimkit.backbones, mimkit.methods, mimkit.schema; "
            "bad = [m for m in ('mimkit.config', 'mimkit.models') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_schema_imports_nothing_of_mimkit_but_errors():
    code = ("import sys, mimkit.schema; "
            "ours = sorted(m for m in sys.modules if m.startswith('mimkit.')); "
            "assert ours == ['mimkit.errors', 'mimkit.schema'], ours")
    subprocess.run([sys.executable, "-c", code], check=True)
