"""Tests of the evals package (evals/)."""
