"""The evaluation engine: benchmarks as data (YAML + hook kinds), a crash-safe runner with a journal,
metrics with bootstrap intervals, paired comparison of runs, and HTML reports."""
