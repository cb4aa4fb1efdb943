"""The package's layering (tools/check_layering.py): no import, at module top or inside a function, goes the wrong
way between layers (config below everything, model without training, data or parallel, the doctor without the
trainer, ...)."""

import subprocess
import sys

from conftest import ROOT


def test_no_import_breaks_the_layering():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_layering.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
