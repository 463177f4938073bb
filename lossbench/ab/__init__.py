"""`lossbench ab`: two sides (commits, checkouts, pythons) measured in one job, samples interleaved.

sides.py (what each side is), worker.py (one side's process), session.py (the interleaved measurement,
the run file), command.py (the command: measure, then report/ab.py's verdicts)."""
