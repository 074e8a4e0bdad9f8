"""The options every method shares. Each recipe subclasses ``TrainConfig`` with its own fields."""

from __future__ import annotations

from dataclasses import dataclass

from bonbench.cli import log_level_option
from bonbench.config import option
from distill.precision import PRECISIONS

LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    # -- models -------------------------------------------------------------------------------
    model: str = option("default", "reference policy: 'default' (embedded SmolLM2-135M-Instruct), hub id or folder")
    reward_model: str = option("default", "reward: 'default', a HF reward model, 'module:function' or 'judge' "
                                         "(an LLM judge: see --judge-model)")
    judge_model: str = option("", "--reward-model judge: the judge's model name at --judge-base-url")
    judge_base_url: str = option("", "--reward-model judge: OpenAI-compatible base URL of the judge "
                                    "(default: OpenAI's), e.g. http://127.0.0.1:8001/v1")
    judge_api_key_env: str = option("OPENAI_API_KEY", "--reward-model judge: environment variable holding the "
                                                     "judge's API key (the key itself never lands in the run folder)")
    lora: bool = option(True, "train LoRA adapters (policy and anchor share the base); false: full fine-tuning")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_targets: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                    "modules that get LoRA adapters")
    lora_top_layers: int = option(8, "LoRA on the top L transformer layers only (0: all). Exact, and cheap: "
                                    "the frozen layers below build no autograd graph")
    generation: str = option("transformers", "sampling engine: 'transformers' (in-process) or 'vllm' "
                                            "(a vLLM engine synced to the trained weights; see distill/vllm_generation.py)")
    vllm_gpu_memory_utilization: float = option(0.5, "--generation vllm: share of the GPU's memory vLLM may take "
                                                    "(weights and KV cache); the trainer needs the rest")
    vllm_max_model_len: int = option(0, "--generation vllm: context length of vLLM's KV cache in tokens "
                                       "(0: the model's own); prompt + max_tokens must fit")
    vllm_enforce_eager: bool = option(False, "--generation vllm: no CUDA graphs or torch.compile "
                                            "(starts faster, decodes slower)")
    dtype: str = option("auto", "auto (bf16 on GPUs that have it, else fp32), float32, bfloat16")
    device: str = option("auto", "auto (cuda if available, else cpu), cpu or cuda")
    precision: str = option("auto", "auto (bf16 where the device computes it natively: avx512_bf16/amx_bf16 CPUs, "
                                   "bf16 GPUs; else fp32), fp32 or bf16: the frozen layers below the LoRA layers "
                                   "run in bf16; adapters, LoRA weights and losses stay fp32 (distill/precision.py)")
    # -- data ---------------------------------------------------------------------------------
    task: str = option("default", "prompt set: 'default' (shipped news passages), 'xsum', or a dataset with XSum's columns")
    train_limit: int = option(0, "use only the first N training prompts (0: all)")
    eval_split: str = option("test", "split for periodic evaluation")
    eval_prompts: int = option(16, "held-out prompts per evaluation (0: no evaluation)")
    eval_k: int = option(8, "reference samples per evaluation prompt (for quantiles and win rate)")
    # -- optimisation -------------------------------------------------------------------------
    steps: int = option(24, "optimiser steps")
    batch_prompts: int = option(8, "prompts per optimiser step (split over grad_accum micro-batches)")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(3e-4, "learning rate (Adam with LoRA: ~1e-4..5e-4; full fine-tuning: ~1e-6..1e-5)")
    optimizer: str = option("adamw", "'adamw' (no weight decay) or 'sgd' (with --momentum): Adam moves every "
                                     "trained weight about lr a step, SGD in proportion to its gradient")
    momentum: float = option(0.9, "--optimizer sgd: momentum (0: plain SGD)")
    warmup_steps: int = option(4, "linear learning-rate warm-up")
    lr_schedule: str = option("constant", "after the warm-up: 'constant', or decay to zero by the last step, "
                                         "'linear' or 'cosine' (the lr of Hugging Face's Trainer decays linearly)")
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)")
    max_tokens: int = option(40, "tokens per sampled answer")
    temperature: float = option(1.0, "sampling temperature (1: samples from pi itself, as the losses assume)")
    seed: int = option(0, "seed for data order, sampling and initialisation")
    # -- bookkeeping --------------------------------------------------------------------------
    out: str = option("runs/distill", "run folder: checkpoints, metrics.jsonl, TensorBoard events, eval")
    eval_every: int = option(12, "evaluate every N steps (and at the start and the end)")
    save_every: int = option(10, "checkpoint every N steps (and at the end)")
    snapshot_every: int = option(0, "also keep the policy of every N-th step in snapshots/step-N, each loadable "
                                    "like policy/, to measure a run's path afterwards (0: off)")
    resume: bool = option(True, "continue from the run folder's checkpoint if there is one")
    reference_cache: str = option("", "folder of reference samples shared by the runs of a sweep: the first run "
                                     "stores each reference draw, later runs with the same model, prompts, seeds "
                                     "and max_tokens read it back (distill/reference_cache.py); empty: off")
    threads: int = option(0, "torch CPU threads (0: torch's default)")
    log_level: str = log_level_option()
    diagnostics: bool = option(False, "per step, also the gradient norm of each loss term and their cosines "
                                     "(one extra backward pass per term; off: a step costs what it did)")

    def __post_init__(self) -> None:
        if self.batch_prompts % self.grad_accum:
            raise ValueError(f"batch_prompts ({self.batch_prompts}) must be a multiple of grad_accum ({self.grad_accum})")
        if self.steps < 1 or self.batch_prompts < 1:
            raise ValueError("steps and batch_prompts must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError("snapshot_every must be >= 0 (0: no snapshots)")
        if self.temperature != 1.0:
            raise ValueError("the BOND losses assume samples from pi itself: keep temperature 1")
        if self.eval_prompts and self.eval_k < 2:
            raise ValueError("eval_k must be >= 2 (quantiles and win rates need reference samples)")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.generation not in ("transformers", "vllm"):
            raise ValueError(f"generation must be 'transformers' or 'vllm', got {self.generation!r}")
        if self.reward_model == "judge" and not self.judge_model:
            raise ValueError("--reward-model judge needs --judge-model: the model name the judge's server answers to")
        if self.reward_model != "judge" and (self.judge_model or self.judge_base_url):
            raise ValueError(f"--judge-model and --judge-base-url configure --reward-model judge; the reward is "
                             f"{self.reward_model!r}, so the judge would never be asked")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError("vllm_gpu_memory_utilization is a share of the GPU's memory: in (0, 1]")
