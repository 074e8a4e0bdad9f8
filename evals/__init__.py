"""Evaluations beyond bonbench measure: academic benchmarks, summarisation, judges and the report."""
