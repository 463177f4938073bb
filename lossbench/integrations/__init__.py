"""lossbench's cases and implementations under other tools' timers: asv (benchmarks/) and pytest-benchmark."""
