"""bf16 for the frozen trunk: where the hardware computes it natively, the layers nothing trains run in bf16.

``--precision bf16`` stores the weights of every decoder layer that has no trainable parameter in
bfloat16 and runs those layers under ``torch.autocast``; the layers that carry LoRA adapters, the
embeddings, the final norm and the LM head stay in fp32, and so do the LoRA weights (the optimiser's
master copy) and the losses. With LoRA on the top L layers (the default) the trunk below them is
most of a forward pass, and backward never enters it. With LoRA on every layer or full fine-tuning
no layer is frozen, and bf16 changes nothing.

Why only the trunk: the losses read log-ratios between the policy, the anchor and the reference,
which differ only in the adapted layers. A bf16 trunk perturbs all three alike. On the embedded
default (LoRA r16 on the top 8 of 30 layers, 16 answers of ~38 tokens, after two J-BOND steps;
``reports/bench/trainer_step.md``) it moved sequence log-probs by 0.085 nats on average (0.32 at
most) and the policy/anchor and policy/reference log-ratios by 0.001 (0.002). In a first probe with
random adapters, every layer under autocast moved the log-ratios by 0.17 on average, and bf16 weights
without autocast (a bf16 residual stream) by 0.33, where the KL to the anchor early in a run is
about 0.05: too coarse for the losses. The same benchmark measured what it buys on a shared 2-core
CPU: the log-prob passes 1.46x faster, sampling hardly (small decoding batches), the default J-BOND
step 0.94x the fp32 time. Sampling gained nothing then because the decoding attention ran its
autocast bf16 products without oneDNN; since it asks which dtype its products run in
(``bonbench.backends.shared_prefix.product_dtype``), a J-BOND sampling call on a 2-core AMX Xeon
takes half the time (``reports/bench/trainer-sampling.md``).

``auto`` picks bf16 where it is native (``bonbench.hardware.native_bf16``, the one home for that
check), fp32 elsewhere: a CPU without native bf16 emulates bf16 matrix products, slower than fp32.
"""

from __future__ import annotations

import logging
from typing import Iterable, Literal

import torch

from bonbench.backends.trunk import decoder_layers
from bonbench.hardware import native_bf16

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")
def resolve_precision(requested: str, device: str, flags: Iterable[str] | None = None) -> Precision:
    """``auto`` becomes bf16 where ``native_bf16(device, flags)``, else fp32; ``fp32`` and ``bf16`` stay."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested == "auto":
        return "bf16" if native_bf16(device, flags) else "fp32"
    if requested == "bf16" and not native_bf16(device, flags):
        log.warning("--precision bf16 on %s without native bf16: it will be emulated, likely slower than fp32", device)
    return requested  # type: ignore[return-value]


class _Bf16Layer(torch.nn.Module):
    """Runs a frozen decoder layer under bf16 autocast; its input and output stay in the caller's dtype."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes a model reads off its layers (attention type, index)
            return getattr(self.layer, name)

    def forward(self, *args, **kwargs):
        device = next(self.layer.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16):
            return self.layer(*args, **kwargs)


def bf16_frozen_trunk(model: torch.nn.Module) -> int:
    """Move every decoder layer without trainable parameters or LoRA weights to bf16 (weights stored
    in bf16, run under autocast, so no cast per call); returns how many layers moved. Call it once,
    after the adapters exist and ``requires_grad`` is set; it cannot be undone."""
    layers = decoder_layers(model)
    moved = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, _Bf16Layer):
            continue
        if any(p.requires_grad or "lora_" in name for name, p in layer.named_parameters()):
            continue
        for p in layer.parameters():
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        layers[i] = _Bf16Layer(layer)
        moved += 1
    return moved
