"""The request models keep the promise of ``protocol.py``'s docstring: OpenAI's fields first, in the
order the official ``openai`` client's ``create()`` lists them, then the Best-of-N extensions."""

from __future__ import annotations

import inspect

import openai
import pytest

from bonbench.server.protocol import ChatCompletionRequest, CompletionRequest

BEST_OF_N_EXTRAS = ["best_of", "return_candidates", "selection", "selection_params", "early_rejection"]


@pytest.mark.parametrize("model, create", [
    (ChatCompletionRequest, openai.resources.chat.Completions.create),
    (CompletionRequest, openai.resources.Completions.create),
])
def test_openai_fields_come_first_in_the_clients_order_then_the_extras(model, create):
    fields = list(model.model_fields)
    assert fields[-len(BEST_OF_N_EXTRAS):] == BEST_OF_N_EXTRAS
    openai_fields = fields[:-len(BEST_OF_N_EXTRAS)]
    client_order = [name for name in inspect.signature(create).parameters if name in openai_fields]
    assert openai_fields == client_order  # also: every field before the extras is one of OpenAI's
