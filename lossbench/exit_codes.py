"""Every exit status lossbench's commands end with, in one place. Scripts and CI jobs test these
numbers: they never change. README.md's table "Exit codes" lists the same (tests/test_exit_codes.py
checks it).

| status | name | commands | meaning |
| --- | --- | --- | --- |
| 0 | `OK` | every command | done: nothing regressed, no row failed, the nightly baseline moved |
| 1 | `REGRESSION` | compare, ab, nightly | a row regressed |
| 1 | `FAILED` | run, kernels | rows failed to run (error, oom, timeout, crash); a kernel variant did not compile |
| 2 | `USAGE` | every command | bad input (one line on stderr): nothing was measured or compared |
| 3 | `NIGHTLY_FAILED_ROWS` | nightly | rows failed to run, and nothing regressed |
| 4 | `NO_BASELINE` | nightly | no baseline yet for a device: this run becomes it |
| 130 | `INTERRUPTED` | run, ab, nightly | the run stopped before it was complete (Ctrl-C: 128 + SIGINT); resume it |
"""
from __future__ import annotations

OK = 0
REGRESSION = 1
FAILED = 1                # `run` and `kernels` have no verdicts: 1 is their failure
USAGE = 2
NIGHTLY_FAILED_ROWS = 3   # nightly tells a failed row from a regression: the baseline stays for both
NO_BASELINE = 4           # the CI job passes on it (the first night of a device)
INTERRUPTED = 130         # the shell's status for a process ended by SIGINT

CODES = {"OK": OK, "REGRESSION": REGRESSION, "FAILED": FAILED, "USAGE": USAGE,
         "NIGHTLY_FAILED_ROWS": NIGHTLY_FAILED_ROWS, "NO_BASELINE": NO_BASELINE, "INTERRUPTED": INTERRUPTED}
