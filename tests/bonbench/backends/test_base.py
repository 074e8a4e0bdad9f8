"""The generation seam's shared rules."""

from __future__ import annotations

import pytest

from bonbench.backends.base import PromptTooLong, check_context


def test_a_prompt_fits_when_it_and_max_tokens_fill_the_context_at_most():
    check_context(96, 32, 128)  # exactly full
    check_context(10_000, 32, None)  # unknown context: nothing to check
    with pytest.raises(PromptTooLong, match=r"97 tokens and max_tokens is 32: .* context of 128 tokens; raise it"):
        check_context(97, 32, 128, hint="raise it")
