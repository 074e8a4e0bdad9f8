"""The project's own lm-eval tasks over local JSONL (YAML configs, data and their checkers)."""
