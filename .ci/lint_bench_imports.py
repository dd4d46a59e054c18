"""Check bench/'s import contracts (.importlinter-bench) the way `lint-imports` checks src's.

bench/ scripts run with PYTHONPATH=src:bench and import each other as top-level modules
(`from common import ...`). grimp builds graphs of packages only, so each tracked bench/NAME.py
is copied to a throwaway NAME/__init__.py (same top-level name, same source) and checked there;
a tracked bench module that .importlinter-bench's root_packages does not name fails the check,
so a new script cannot slip past the contracts. Run: .venv/bin/python .ci/lint_bench_imports.py
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter-bench"


def bench_modules() -> list[str]:
    """Names of bench/*.py that git tracks (all of them outside a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "--", ":(glob)bench/*.py"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        out = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")]
    return sorted(Path(p).stem for p in out if (ROOT / p).is_file())


def listed_modules() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(CONFIG, encoding="utf-8")
    return set(parser["importlinter"]["root_packages"].split()) - {"loralab"}


def main() -> int:
    modules = bench_modules()
    missing, stale = sorted(set(modules) - listed_modules()), sorted(listed_modules() - set(modules))
    if missing or stale:
        for name in missing:
            print(f"bench/{name}.py is not in {CONFIG.name}'s root_packages (and its contracts)")
        for name in stale:
            print(f"{CONFIG.name} lists {name}, which is not a tracked bench/*.py")
        return 1
    from importlinter.cli import lint_imports

    with tempfile.TemporaryDirectory() as shadow:
        for name in modules:
            (Path(shadow) / name).mkdir()
            shutil.copy(ROOT / "bench" / f"{name}.py", Path(shadow) / name / "__init__.py")
        sys.path[:0] = [shadow, str(ROOT / "src")]
        return lint_imports(config_filename=str(CONFIG), no_cache=True)


if __name__ == "__main__":
    sys.exit(main())
