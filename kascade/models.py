"""Loading models from local directories (nothing is downloaded) and the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_DIR = REPO_ROOT / "models" / "kascade-tiny"
TINY_PLAN = REPO_ROOT / "plans" / "kascade-tiny.json"
RANDOM_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-random-llama.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(model_dir) -> Path:
    """ValueError unless `model_dir` is a local directory holding a config.json."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"MODEL_DIR: {str(model_dir)!r} is not a local directory; kascade downloads nothing at run "
                         "time, so pass a directory in HF format (config.json, weights, tokenizer)")
    if not (path / "config.json").is_file():
        raise ValueError(f"MODEL_DIR: {path} has no config.json; expected a model saved with save_pretrained")
    return path


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(model_dir, device: str | None = None, dtype: str | None = None):
    """(model, tokenizer) from a local HF directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(model_dir)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=resolve_dtype(dtype, dev))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(dev).eval(), tokenizer


def random_model(config_path=RANDOM_CONFIG, seed: int = 0, dtype: torch.dtype = torch.float32, device=None):
    """A randomly initialised model from a config file (random weights: plumbing and speed only).

    device=None builds it on the CPU with transformers' initialisation. With a device the model is
    built without memory (meta), then allocated there and filled with N(0, initializer_range) weights
    (norm weights 1, biases 0) from a seeded generator on that device: an 8B shape in bf16 takes
    seconds and no host memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**json.loads(Path(config_path).read_text()))
    torch.manual_seed(seed)
    if device is None:
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    device = torch.device(device)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters (embeddings / lm_head) separate storage
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
        for mod in model.modules():  # non-persistent buffers (rotary inv_freq) were never materialised
            if isinstance(getattr(mod, "inv_freq", None), torch.Tensor) and hasattr(mod, "config"):
                fresh = type(mod)(mod.config)  # built on the CPU, outside the meta context
                for buf in ("inv_freq", "original_inv_freq"):
                    if hasattr(mod, buf):
                        setattr(mod, buf, getattr(fresh, buf).to(device))
                mod.attention_scaling = fresh.attention_scaling
    return model.eval()
