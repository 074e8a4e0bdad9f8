"""``python -m bonbench COMMAND``: serve, measure."""

from __future__ import annotations

import sys

COMMANDS = {
    "serve": ("bonbench.serve", "an OpenAI-compatible Best-of-N server"),
    "measure": ("bonbench.measure", "what Best-of-N buys and costs: win rate, KL, quantiles, cost"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items()]
        print("usage: python -m bonbench COMMAND [options]   (COMMAND --help for its options)\n\ncommands:\n"
              + "\n".join(lines))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    from bonbench.cli import run_command

    module = importlib.import_module(COMMANDS[argv[0]][0])
    run_command(module.main, argv[1:])


if __name__ == "__main__":
    main()
