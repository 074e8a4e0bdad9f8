"""Evaluations of Best-of-N and distilled policies: pure metrics (``evals.metrics``) and the
commands that write their tables into run folders (``python -m evals.judge``, ...)."""
