"""Benchmarks (`al bench ...`): measured figures written as JSON (--results-dir, default benchmarks/results)
and as tables in a Markdown report (--report, default docs/benchmarks.md), each with the machine and the
exact command. One module per benchmark; report.py is what they share; commands.py is their command line."""
