"""Scoring works on a machine without torch: importing it must not pull torch in."""

from __future__ import annotations

import subprocess
import sys

MODULES = ("loralab.scoring.tasks", "loralab.scoring.tag_scores", "loralab.scoring.generic",
           "loralab.scoring.references", "loralab.scoring.stats")


def test_scoring_imports_without_torch():
    code = f"import sys; import {', '.join(MODULES)}; assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
