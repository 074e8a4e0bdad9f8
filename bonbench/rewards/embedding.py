"""The embedded default reward: a faithful, short, abstractive one-sentence summary scores high.

Plain embedding similarity to the passage is a reward a trainer games at once: the passage
itself scores about 0.9. So the similarity is only the first term, and the answer pays for
each way of gaming it. With ``a`` the answer and ``s`` the source passage::

    reward = cos(e(a), e(s))                        relevance (all-MiniLM-L6-v2, mean-pooled)
           - 0.6 * min(1, max(0, run - 6) / 12)     copying: run = longest verbatim word run shared with s
           - 0.4 * unsupported                      hallucination: share of the answer's numbers and
                                                    capitalised names that s does not contain
           - 0.02 * max(0, 10 - words)              too short
           - 0.02 * max(0, words - 35)              rambling
           - 0.15 * (sentences - 1)                 more than one sentence
           - 0.25 * [no final . ! ? or quote]       truncated mid-sentence
           - 0.5 * repeated                         share of the answer's word trigrams seen before in it

clipped to [-0.99, 1]; an empty answer gets -1, below every other.

Partial answers (``score_partial``, for early rejection): an answer cut after a fixed number of tokens
is short and unfinished by construction, so the "too short" and "truncated" terms are left out, and
a last word that the cut may have split is dropped; every other term reads the text as it stands
(a partial answer that already rambles, repeats or copies keeps paying for it).

The source is the part of the prompt after its first blank line (the default task writes the
instruction, a blank line, then the article); without a blank line, the whole prompt. The
weights were set by hand on the default task so that a reference summary beats the copied
passage, the copied lead sentence, a truncated or rambling answer and another passage's summary
(``tests/bonbench/rewards/test_embedding.py``). It is a proxy: it knows nothing of facts beyond
entity overlap, and it is deterministic (fp32, eval mode), batched over the whole call.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import torch

from bonbench.backends.base import Prompt, prompt_text

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_ENTITY = re.compile(r"\b(?:\d[\d,.]*\d|\d|[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)*)\b")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*\s+(?=[\"'“‘(]?[A-Z0-9])")
_FINAL = re.compile(r"[.!?][\"'”’)]*$")


class RewardTerms(NamedTuple):
    """The reward of one answer, term by term (each penalty is already weighted)."""

    reward: float
    relevance: float
    copying: float
    hallucination: float
    length: float
    sentences: float
    truncation: float
    repetition: float


def source_of(prompt: Prompt) -> str:
    text = prompt_text(prompt)
    head, sep, tail = text.partition("\n\n")
    return tail.strip() if sep and tail.strip() else text.strip()


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def longest_shared_run(answer: list[str], source: list[str]) -> int:
    """Length of the longest run of consecutive words found verbatim in both (dynamic programming)."""
    best, prev = 0, [0] * (len(source) + 1)
    for a in answer:
        cur = [0] * (len(source) + 1)
        for j, s in enumerate(source, start=1):
            if a == s:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def unsupported_entities(answer: str, source: str) -> float:
    """Share of the answer's numbers and capitalised words (past its first word) absent from the source."""
    tokens = _ENTITY.findall(answer)
    first = _WORD.search(answer)
    if first and tokens and tokens[0] == first.group(0):
        tokens = tokens[1:]  # the capital that starts a sentence says nothing
    if not tokens:
        return 0.0
    source_lower = source.lower().replace(",", "")
    missing = sum(1 for t in tokens if t.lower().replace(",", "") not in source_lower)
    return missing / len(tokens)


def whole_words(partial_answer: str) -> str:
    """``partial_answer`` without its last word when a cut may have split it (no space after it)."""
    text = partial_answer.rstrip()
    if text != partial_answer or not text or text[-1] in ".!?,;:\"')”’":
        return text
    head, sep, _ = text.rpartition(" ")
    return head.rstrip() if sep and head.strip() else text


def penalty_terms(answer: str, source: str, partial: bool = False) -> dict[str, float]:
    """Every term but relevance, weighted as in the module docstring; ``partial``: the terms of an
    unfinished answer (no "too short" or "truncated" term)."""
    words, source_words = _words(answer), _words(source)
    run = longest_shared_run(words, source_words)
    trigrams = list(zip(words, words[1:], words[2:]))
    repeated = (len(trigrams) - len(set(trigrams))) / len(trigrams) if trigrams else 0.0
    sentences = 1 + len(_SENTENCE_END.findall(answer.strip()))
    return {
        "copying": 0.6 * min(1.0, max(0, run - 6) / 12),
        "hallucination": 0.4 * unsupported_entities(answer, source),
        "length": (0.0 if partial else 0.02 * max(0, 10 - len(words))) + 0.02 * max(0, len(words) - 35),
        "sentences": 0.15 * (sentences - 1),
        "truncation": 0.0 if partial or _FINAL.search(answer.strip()) else 0.25,
        "repetition": 0.5 * repeated,
    }


class EmbeddingReward:
    """The default summary reward on all-MiniLM-L6-v2 (see the module docstring)."""

    name = "default"

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from bonbench.models import embedded_embedder_path

        path = str(path or embedded_embedder_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm mean-pooled embeddings, shape (len(texts), 384); inputs past 256 word pieces are cut."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(**batch).last_hidden_state
            weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, 384)

    def terms(self, prompts: Sequence[Prompt], responses: Sequence[str], partial: bool = False) -> list[RewardTerms]:
        if partial:
            responses = [whole_words(r) for r in responses]
        sources = [source_of(p) for p in prompts]
        unique = list(dict.fromkeys(sources))
        nonempty = [i for i, r in enumerate(responses) if r.strip()]
        embeddings = self.embed(unique + [responses[i] for i in nonempty])
        source_emb = dict(zip(unique, embeddings[: len(unique)]))
        answer_emb = dict(zip(nonempty, embeddings[len(unique) :]))
        out = []
        for i, (source, response) in enumerate(zip(sources, responses)):
            if i not in answer_emb:
                out.append(RewardTerms(-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
                continue
            relevance = float(answer_emb[i] @ source_emb[source])
            penalties = penalty_terms(response, source, partial)
            reward = max(-0.99, min(1.0, relevance - sum(penalties.values())))
            out.append(RewardTerms(reward=reward, relevance=relevance, **penalties))
        return out

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return [t.reward for t in self.terms(prompts, responses)]

    def score_partial(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Scores of unfinished answers (see the module docstring), for early rejection."""
        return [t.reward for t in self.terms(prompts, responses, partial=True)]
