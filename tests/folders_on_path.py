"""Test modules share helpers by name (`from test_step import synthetic_batch`) across the
package folders they sit in: this puts tests/, every folder of test modules and the repository
(for `configs`) on sys.path (conftest.py does it for pytest; the worker scripts, which run
alone, do it themselves)."""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
FOLDERS = [
    TESTS.parent,
    TESTS,
    *sorted(p for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))),
]


def add_test_folders() -> None:
    for folder in reversed(FOLDERS):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


add_test_folders()  # on import: `import folders_on_path` before importing test modules
