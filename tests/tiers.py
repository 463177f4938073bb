"""The fast test tier (`make test`, `pytest -m "not slow"`) must still touch every module of lossbench:
after a whole fast-tier session, every module is imported in the test process, or is one that only runs
in a child process the tests start (listed here with the test that runs it)."""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lossbench"
# Run only as a child process, never imported by the test process:
CHILD_ONLY = {
    "lossbench.__main__": "python -m lossbench (test_ab, test_faults, test_cli)",
}


def package_modules(root: Path = PACKAGE) -> set[str]:
    """Every module of the package, by file (importing them to list them would defeat the check)."""
    out = set()
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def untouched(loaded: set[str], modules: set[str] | None = None) -> list[str]:
    """The modules neither loaded nor run as a child: what the fast tier no longer touches."""
    modules = package_modules() if modules is None else modules
    return sorted(m for m in modules if m not in loaded and m not in CHILD_ONLY)


def is_whole_fast_tier(config) -> bool:
    """The session ran the fast tier as `make test` does: every test file, deselected by `-m "not slow"`
    only (a single file or a -k selection touches less, and says nothing about the tier)."""
    testpaths = [str(Path(config.rootpath) / p) for p in config.getini("testpaths")]
    args = [str(Path(a).resolve()) for a in config.args]
    return (config.option.markexpr.strip() == "not slow" and not config.option.keyword
            and args == [str(Path(p).resolve()) for p in testpaths])


def loaded_modules() -> set[str]:
    return {m for m in sys.modules if m == "lossbench" or m.startswith("lossbench.")}
