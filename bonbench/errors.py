"""The one error type for bad user input: a model, a path or a spec that cannot be used.

Loading code (``bonbench.models``, ``bonbench.rewards``) raises ``UserError`` with one sentence
that says what was wrong and what to do; ``bonbench.cli.run_command`` prints that sentence
instead of a traceback. Errors of the HTTP API live apart, in ``bonbench.server.errors``.
"""

from __future__ import annotations


class UserError(Exception):
    """Input from the user cannot be used; the message is one sentence that says why and what to do."""
