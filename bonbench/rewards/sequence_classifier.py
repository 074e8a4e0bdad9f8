"""Any Hugging Face reward model with a one-logit ``AutoModelForSequenceClassification`` head.

The conversation (prompt, then the answer as the assistant's turn) goes through the reward
model's own chat template when it has one, so models trained on templated chats (Skywork,
ArmoRM, ...) see their training format. Without a template, prompt and answer are joined by a
blank line.

A conversation longer than the classifier's context is cut from the left: the start of the
prompt goes (the first token is kept when it is BOS), the answer never does. An answer that
alone does not fit is a ``RewardError``, never a score of a truncated answer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bonbench.backends.base import Prompt, is_chat
from bonbench.errors import UserError
from bonbench.rewards.base import RewardError


class SequenceClassifierReward:
    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto", batch_size: int = 16,
                 max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from bonbench.models import locate_model, pick_dtype

        self.name = path
        local = locate_model(path, kind="reward model")
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = AutoModelForSequenceClassification.from_pretrained(local, dtype=pick_dtype(dtype, device))
        self.model.to(device).eval()
        if self.model.config.num_labels != 1:
            raise UserError(f"{path} has {self.model.config.num_labels} output labels, but a reward model has "
                            "one: pass a reward model (a sequence classifier with a single score).")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length or _context_length(self.tokenizer, self.model.config)

    def _text(self, prompt: Prompt, response: str) -> str:
        messages = list(prompt) if is_chat(prompt) else [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
        return f"{messages[-1]['content']}\n\n{response}"

    def encode(self, prompt: Prompt, response: str) -> list[int]:
        """The token ids the classifier reads for one (prompt, answer) pair, at most ``max_length``."""
        text = self._text(prompt, response)
        # A chat template writes its own special tokens; plain text gets the tokenizer's ([CLS] ... [SEP]).
        encoded = self.tokenizer(text, add_special_tokens=not self.tokenizer.chat_template,
                                 return_offsets_mapping=True)
        ids = encoded["input_ids"]
        if len(ids) <= self.max_length:
            return ids
        answer = response.strip()  # templates may trim the answer's outer whitespace
        start = text.rfind(answer) if answer else len(text)
        if start < 0:
            raise RewardError(f"reward model {self.name!r}: its chat template rewrites the answer, so a "
                              f"conversation of {len(ids)} tokens cannot be cut to {self.max_length} safely")
        first = next((i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > start), len(ids))
        head = ids[:1] if ids[0] == self.tokenizer.bos_token_id else []
        room = self.max_length - len(head)
        if len(ids) - first > room:
            raise RewardError(f"reward model {self.name!r} reads at most {self.max_length} tokens, and the answer "
                              f"with the chat template's closing tokens takes {len(ids) - first}: lower max_tokens")
        return head + ids[len(ids) - room:]

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            rows = [{"input_ids": ids} for ids in encoded[start : start + self.batch_size]]
            batch = self.tokenizer.pad(rows, padding=True, return_tensors="pt").to(self.device)
            scores.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        return scores


def _context_length(tokenizer, config) -> int:
    """The longest input a classifier reads: its tokenizer's limit or its position embeddings, the smaller.
    (A tokenizer with no limit reports a huge ``model_max_length``.)"""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    return min(limit for limit in limits if limit)
