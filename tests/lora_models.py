"""The tiny random model with two randomised LoRA adapters, 'a' and 'b': for the tests of mixed-adapter
sampling and of the frozen trunk below the adapters."""

from __future__ import annotations


def two_adapter_model(model_path: str, layers: list[int] | None = None):
    """``(model, tokenizer)``: the model at ``model_path`` with adapters 'a' and 'b' on ``layers`` (None:
    every layer), their weights drawn at random (seeded) so the three policies, base included, differ."""
    import torch
    from peft import LoraConfig, get_peft_model

    from bonbench.backends.transformers import load_causal_lm

    model, tokenizer = load_causal_lm(model_path)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=layers,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config, adapter_name="a")
    model.add_adapter("b", config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    return model, tokenizer
