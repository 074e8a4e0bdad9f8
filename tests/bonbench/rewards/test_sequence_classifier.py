"""A Hugging Face sequence-classifier reward on a tiny random model with SmolLM2's tokenizer and
chat template: a long prompt is cut from the left, the answer always reaches the classifier,
and an answer that cannot fit is a ``RewardError``."""

from __future__ import annotations

import pytest
import torch

from bonbench.errors import UserError
from bonbench.rewards.base import RewardError
from bonbench.rewards.sequence_classifier import SequenceClassifierReward

MAX_LENGTH = 64  # the classifier's tokenizer limit: a short context makes cutting easy to trigger
LONG_PROMPT = "Summarise the following report. " + "The quarterly numbers rose again. " * 40
ANSWER = "Sales went up for the third quarter running."


def _save_classifier(out, tokenizer_path: str, num_labels: int = 1, tokenizer_limit: int | None = MAX_LENGTH,
                     positions: int = 2 * MAX_LENGTH) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from bonbench.models import RANDOM_SIZES

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer_limit is not None:
        tokenizer.model_max_length = tokenizer_limit
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=positions, num_labels=num_labels,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **RANDOM_SIZES["tiny"])
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def reward(tmp_path_factory, tiny_model_path) -> SequenceClassifierReward:
    return SequenceClassifierReward(_save_classifier(tmp_path_factory.mktemp("reward"), tiny_model_path))


def _conversation_ids(reward: SequenceClassifierReward, prompt: str, answer: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return reward.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_the_context_is_the_smaller_of_tokenizer_and_position_limits(reward, tmp_path, tiny_model_path):
    assert reward.max_length == reward.tokenizer.model_max_length == MAX_LENGTH
    # SmolLM2's own tokenizer sets no real limit: the position embeddings bound the context then.
    unlimited = SequenceClassifierReward(_save_classifier(tmp_path, tiny_model_path, tokenizer_limit=None,
                                                          positions=MAX_LENGTH // 2))
    assert unlimited.tokenizer.model_max_length > 10**9 and unlimited.max_length == MAX_LENGTH // 2


def test_a_conversation_that_fits_is_read_whole_in_the_chat_template(reward):
    ids = reward.encode("Say something short.", ANSWER)
    assert ids == _conversation_ids(reward, "Say something short.", ANSWER)
    assert len(ids) < MAX_LENGTH


def test_a_long_prompt_is_cut_from_the_left_and_the_answer_survives_whole(reward):
    full = _conversation_ids(reward, LONG_PROMPT, ANSWER)
    assert len(full) > MAX_LENGTH
    ids = reward.encode(LONG_PROMPT, ANSWER)
    assert len(ids) == MAX_LENGTH
    assert ids[0] == full[0] == reward.tokenizer.bos_token_id  # BOS stays
    assert ids[1:] == full[-(MAX_LENGTH - 1):]  # then the conversation's last tokens
    text = reward.tokenizer.decode(ids)
    assert ANSWER in text and text.rstrip().endswith("<|im_end|>")
    assert "helpful AI assistant" not in text and "Summarise" not in text  # the prompt's start is gone


def test_behind_a_long_prompt_the_answer_still_decides_the_score(reward):
    # Cutting from the right would score both pairs on the same prompt-only prefix.
    first, second = reward.score([LONG_PROMPT, LONG_PROMPT], [ANSWER, "Sales fell sharply this quarter."])
    assert first != second


def test_scores_do_not_depend_on_the_batch_a_pair_is_padded_in(reward):
    prompts = ["Hi.", LONG_PROMPT, "Tell me about the weather today, please."]
    answers = [ANSWER, ANSWER, "Sunny."]
    together = reward.score(prompts, answers)
    alone = [reward.score([p], [a])[0] for p, a in zip(prompts, answers)]
    assert together == pytest.approx(alone, abs=1e-5)


def test_an_answer_longer_than_the_classifier_reads_is_a_reward_error(reward):
    words = f"reads at most {MAX_LENGTH} tokens, and the answer with the chat template's closing tokens takes"
    with pytest.raises(RewardError, match=words):
        reward.encode("Hi.", "word " * MAX_LENGTH)


def test_a_classifier_with_more_than_one_label_is_a_user_error(tmp_path, tiny_model_path):
    path = _save_classifier(tmp_path, tiny_model_path, num_labels=2)
    with pytest.raises(UserError, match="has 2 output labels, but a reward model has one"):
        SequenceClassifierReward(path)
