"""Tiny random models of sliding-window architectures over a given tokenizer's vocabulary: for the
tests of how the in-process engine serves them (exactly, up to their window) or refuses them."""

from __future__ import annotations

WINDOW = 48

# the engine serves these; it refuses the others, for the reason in their name
SUPPORTED = ("mistral (every layer sliding)", "qwen2 (full, then sliding)", "gemma3 (sliding, then full)")
REFUSED = ("gemma2 (soft-capped logits)", "gpt-oss (attention sinks)")


def sliding_model(kind: str, tokenizer, window: int = WINDOW):
    """A 2-layer random model of ``kind`` (one of ``SUPPORTED`` or ``REFUSED``), in eval mode."""
    import torch
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GptOssConfig,
                              GptOssForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    sizes = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                 bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, sliding_window=window)
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window_pattern=2)
    builders = {
        SUPPORTED[0]: lambda: MistralForCausalLM(MistralConfig(**sizes)),
        SUPPORTED[1]: lambda: Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, max_window_layers=1, **sizes)),
        SUPPORTED[2]: lambda: Gemma3ForCausalLM(Gemma3TextConfig(**gemma, **sizes)),
        REFUSED[0]: lambda: Gemma2ForCausalLM(Gemma2Config(**gemma, **sizes)),
        REFUSED[1]: lambda: GptOssForCausalLM(GptOssConfig(num_local_experts=2, num_experts_per_tok=1,
                                                           **{**sizes, "head_dim": 16})),
    }
    torch.manual_seed(0)
    return builders[kind]().eval()


def save_sliding_model(out_dir, tokenizer, window: int = WINDOW):
    """The Mistral one, saved with ``tokenizer`` as a model folder (what ``bonbench serve --model`` takes)."""
    model = sliding_model(SUPPORTED[0], tokenizer, window)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
