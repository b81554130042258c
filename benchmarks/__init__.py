"""Benchmarks of relbert-ds: throughput, time to quality, evaluator scaling, memory, quality recipe.

Every benchmark is a script (``python benchmarks/<name>.py --help``) that prints a markdown table
and writes a JSON file (default ``benchmarks/results/<name>.json``). Timings are reported as
ratios of arms measured side by side in one run (interleaved repetitions), with the machine's
load average recorded before and after; the results and commands are in docs/PERFORMANCE.md.
"""
