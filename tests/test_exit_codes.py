"""The exit statuses: one module (lossbench/exit_codes.py) and one table in the README, the same numbers."""
import re
from pathlib import Path

from lossbench import exit_codes

README = Path(__file__).resolve().parent.parent / "README.md"


def _table(text: str) -> dict[str, int]:
    """The rows `| status | `NAME` | ...` of the README's section "Exit codes"."""
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {m[2]: int(m[1]) for m in re.finditer(r"^\| (\d+) \| `(\w+)` \|", section, re.M)}


def test_the_readme_lists_every_exit_code_with_its_number():
    assert _table(README.read_text()) == exit_codes.CODES


def test_the_module_table_lists_every_constant():
    names = {n: v for n, v in vars(exit_codes).items() if n.isupper() and isinstance(v, int)}
    assert names == exit_codes.CODES
    assert _table("\n## Exit codes\n" + exit_codes.__doc__) == exit_codes.CODES


def test_the_numbers_users_depend_on():
    assert (exit_codes.OK, exit_codes.REGRESSION, exit_codes.FAILED, exit_codes.USAGE, exit_codes.NIGHTLY_FAILED_ROWS,
            exit_codes.NO_BASELINE, exit_codes.INTERRUPTED) == (0, 1, 1, 2, 3, 4, 130)
