"""Any Hugging Face reward model with a one-logit ``AutoModelForSequenceClassification`` head.

The conversation (prompt, then the answer as the assistant's turn) goes through the reward
model's own chat template when it has one, so models trained on templated chats (Skywork,
ArmoRM, ...) see their training format. Without a template, prompt and answer are joined by a
blank line.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bonbench.backends.base import Prompt, is_chat


class SequenceClassifierReward:
    def __init__(self, path: str, device: str = "cpu", dtype: str = "auto", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from bonbench.models import pick_dtype

        self.name = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=pick_dtype(dtype, device))
        self.model.to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{path} has {self.model.config.num_labels} labels; a reward model has one")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = device
        self.batch_size = batch_size

    def _text(self, prompt: Prompt, response: str) -> str:
        messages = list(prompt) if is_chat(prompt) else [{"role": "user", "content": prompt}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                messages + [{"role": "assistant", "content": response}], tokenize=False
            )
        return f"{messages[-1]['content']}\n\n{response}"

    @torch.inference_mode()
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        texts = [self._text(p, r) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            scores.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        return scores
