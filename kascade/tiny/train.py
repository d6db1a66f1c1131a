"""Train ``kascade-tiny`` (transformers' ``LlamaForCausalLM``) at 8K context.

Model: 12 layers, hidden 256, 8 query heads and 4 key/value heads of
dimension 64 (GQA group 2), SwiGLU MLP 640, RoPE theta 500000, tied
embeddings, vocabulary 5120, 8192 positions: 11.93M parameters.

Data: every training sequence holds 8192 real tokens. About half of the
sequences start with synthetic retrieval documents of
:mod:`kascade.tiny.synthetic` (training seeds and keys; generated on the fly
in DataLoader worker processes, tokenised there) and are completed with
corpus text; the others are windows of the pre-tokenised corpus
(``train_tokens.npy`` or ``train_tokens.npy.xz``, uint16). Documents are
packed without cross-document masking.

Optimisation: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear
warmup then cosine decay to 10% driven by the wall-clock budget
(``--minutes``), bf16 autocast, SDPA attention, gradient clipping at 1.

At the end: ``save_pretrained`` in bf16 with 15 MB shards plus the
tokenizer (``DIR/model``), then a quick check of single-needle retrieval at
4K and 8K and variable tracking at 8K on evaluation seeds, recorded with the
run's statistics in ``DIR/train_info.json``. The loss is logged every
``--log-every`` steps to ``DIR/loss.jsonl``. ``--init`` continues from a
saved model (a second stage with its own schedule and data mixture).

Command line::

    python -m kascade.tiny.train --minutes 8 --out DIR [--data .data/carry]
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kascade.eval import templates as T

from . import DATA_DIR
from .synthetic import TRAIN_WEIGHTS, fit_to_tokens, make_sample

SEQ_LEN = 8192


def model_config(vocab_size: int = 5120, bos: int = 0, eos: int = 1, pad: int = 2):
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=640,
              num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
              hidden_act="silu", max_position_embeddings=SEQ_LEN, initializer_range=0.02,
              rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
              bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, use_cache=True)
    try:
        cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **kw)
    except TypeError:
        cfg = LlamaConfig(rope_theta=500000.0, **kw)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta != 500000.0:
        cfg = LlamaConfig(rope_theta=500000.0, **kw)
    return cfg


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def resolve_tokens(data_dir: Path, tmp: Path = Path("/tmp")) -> Path:
    """Path of an uncompressed ``train_tokens.npy`` (decompressing ``.xz`` once)."""
    p = data_dir / "train_tokens.npy"
    if p.exists():
        return p
    xz = data_dir / "train_tokens.npy.xz"
    out = tmp / "kascade_train_tokens.npy"
    if not out.exists() or out.stat().st_mtime < xz.stat().st_mtime:
        with lzma.open(xz) as f, open(out.with_suffix(".part"), "wb") as g:
            shutil.copyfileobj(f, g, 1 << 24)
        out.with_suffix(".part").rename(out)
    return out


class TokenArraySource:
    """Text windows decoded from the pre-tokenised corpus (haystack for training)."""

    def __init__(self, arr: np.ndarray, tok, chars_per_token: float = 3.1):
        self.arr, self.tok, self.cpt = arr, tok, chars_per_token

    def text(self, rng: random.Random, n_chars: int) -> str:
        out = ""
        while len(out) < n_chars:
            n = int((n_chars - len(out)) / self.cpt * 1.15) + 64
            start = rng.randrange(0, len(self.arr) - n)
            txt = self.tok.decode(self.arr[start:start + n].tolist(), skip_special_tokens=True)
            if not out:
                nl = txt.find("\n")
                if 0 <= nl < 400:
                    txt = txt[nl + 1:]
            out += txt if not out else "\n" + txt
        return out[:n_chars]


class MixedStream(IterableDataset):
    """Endless 8192-token sequences: synthetic retrieval documents + corpus text."""

    def __init__(self, tokens_path: str, tokenizer_path: str, seq_len: int = SEQ_LEN,
                 syn_seq_frac: float = 0.5, seed: int = T.TRAIN_SEED_BASE, weights: dict | None = None):
        self.tokens_path, self.tokenizer_path = tokens_path, tokenizer_path
        self.seq_len, self.syn_seq_frac, self.seed = seq_len, syn_seq_frac, seed
        self.weights = weights or TRAIN_WEIGHTS

    def _setup(self):
        from tokenizers import Tokenizer

        wi = get_worker_info()
        wid = wi.id if wi is not None else 0
        self.rng = random.Random(self.seed * 1009 + wid)
        self.arr = np.load(self.tokens_path, mmap_mode="r")
        self.tok = Tokenizer.from_file(self.tokenizer_path)
        self.eos = self.tok.token_to_id("</s>")
        self.source = TokenArraySource(self.arr, self.tok)
        self.cpt = {t: 3.0 for t in self.weights}
        self.tasks = list(self.weights)
        self.w = [self.weights[t] for t in self.tasks]

    def _count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)

    def synthetic_doc(self, max_tokens: int) -> tuple[list[int], str]:
        rng = self.rng
        task = rng.choices(self.tasks, self.w)[0]
        seed = rng.randrange(T.TRAIN_SEED_BASE, 1 << 62)
        sample, n = fit_to_tokens(
            lambda c: make_sample(task, seed, c, "train", essay=self.source),
            max_tokens - 1, self._count, chars_per_token=self.cpt[task], low=0.9)
        ids = self.tok.encode(sample.text).ids + [self.eos]
        self.cpt[task] = 0.7 * self.cpt[task] + 0.3 * (len(sample.text) / max(1, n))
        return ids, task

    def sequence(self) -> tuple[np.ndarray, np.ndarray]:
        L, rng = self.seq_len, self.rng
        ids: list[int] = []
        syn = 0
        if rng.random() < self.syn_seq_frac:
            while L - len(ids) >= 1024:
                room = L - len(ids)
                target = room if rng.random() < 0.5 else rng.randint(1024, room)
                doc, _ = self.synthetic_doc(target)
                ids.extend(doc)
                syn += len(doc)
                if rng.random() < 0.5:
                    break
        need = L - len(ids)
        if need > 0:
            start = rng.randrange(0, len(self.arr) - need)
            ids.extend(self.arr[start:start + need].tolist())
        x = np.asarray(ids[:L], dtype=np.int64)
        mask = np.zeros(L, dtype=np.bool_)
        mask[:min(syn, L)] = True
        return x, mask

    def __iter__(self):
        self._setup()
        while True:
            x, m = self.sequence()
            yield torch.from_numpy(x), torch.from_numpy(m)


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


def lr_at(step: int, progress: float, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def save_model(model, tok_dir: Path, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    m = model.to(torch.bfloat16)
    m.config.use_cache = True
    m.save_pretrained(str(out), max_shard_size="15MB")
    # no max_length: callers give max_new_tokens, and transformers warns when both are set
    GenerationConfig(bos_token_id=m.config.bos_token_id, eos_token_id=m.config.eos_token_id,
                     pad_token_id=m.config.pad_token_id, do_sample=False).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tok_dir / name, out / name)


def pack(model_dir: Path, dest: Path) -> None:
    """Copy the weight shards to ``dest`` and bundle the small files as
    ``dest/model_files.tar.gz`` (keeps the number of files to move small)."""
    import tarfile

    with tarfile.open(dest / "model_files.tar.gz", "w:gz") as tf:
        for f in sorted(model_dir.iterdir()):
            if f.suffix == ".safetensors":
                shutil.copy(f, dest / f.name)
            else:
                tf.add(f, arcname=f.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="train kascade-tiny")
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the training loop")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=DATA_DIR / "carry",
                    help="folder with train_tokens.npy[.xz] and tokenizer/")
    ap.add_argument("--init", type=Path, default=None, help="start from a saved model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=SEQ_LEN)
    ap.add_argument("--lr", type=float, default=2.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--syn-frac", type=float, default=0.55, help="fraction of sequences with synthetic docs")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--task-weights", default=None,
                    help="override synthetic task weights, e.g. vt=0.4,niah_single=0.15")
    ap.add_argument("--seed", type=int, default=T.TRAIN_SEED_BASE + 1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--eval-samples", type=int, default=40)
    ap.add_argument("--eval-seconds", type=float, default=60.0)
    ap.add_argument("--pack", action="store_true",
                    help="write the <=15 MB weight shards and one tar.gz of the other model "
                         "files directly in --out instead of --out/model (few files to move)")
    args = ap.parse_args(argv)
    T.check_seed(args.seed, "train")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()
    torch.manual_seed(args.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok_dir = args.data / "tokenizer"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tokens_path = resolve_tokens(args.data)
    n_corpus = int(np.load(tokens_path, mmap_mode="r").shape[0])
    print(f"corpus tokens {n_corpus:,} ({time.time() - t_start:.1f}s)", flush=True)

    if args.init is not None:
        model = AutoModelForCausalLM.from_pretrained(str(args.init), dtype=torch.float32,
                                                     attn_implementation="sdpa")
    else:
        cfg = model_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32) \
            if hasattr(LlamaForCausalLM, "_from_config") else LlamaForCausalLM(cfg)
    weights = dict(TRAIN_WEIGHTS)
    if args.task_weights:
        for item in args.task_weights.split(","):
            k, v = item.split("=")
            if k not in weights:
                raise SystemExit(f"unknown task {k!r}")
            weights[k] = float(v)
    print(f"task weights {weights}", flush=True)
    ds = MixedStream(str(tokens_path), str(tok_dir / "tokenizer.json"), args.seq, args.syn_frac,
                     args.seed, weights)
    dl = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, pin_memory=dev == "cuda",
                    prefetch_factor=4 if args.workers else None, persistent_workers=args.workers > 0)
    it = iter(dl)  # start the workers before CUDA is initialised

    model.to(dev).train()
    model.config.use_cache = False
    n_params = count_parameters(model)
    print(f"parameters {n_params:,}", flush=True)

    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dev == "cuda")

    log_f = open(out / "loss.jsonl", "w")
    budget = args.minutes * 60.0
    step, tokens, syn_tokens = 0, 0, 0
    acc = {"loss": 0.0, "syn": 0.0, "cor": 0.0, "nsyn": 0, "ncor": 0, "n": 0, "gn": 0.0}
    t_loop = None
    wait_data = 0.0
    amp = torch.bfloat16 if dev == "cuda" else torch.float32
    while True:
        tw = time.time()
        x, m = next(it)
        batch_syn = int(m.sum())
        x = x.to(dev, non_blocking=True)
        m = m.to(dev, non_blocking=True)
        if t_loop is None:
            t_loop = time.time()
            print(f"first batch ready after {t_loop - t_start:.1f}s", flush=True)
        else:
            wait_data += time.time() - tw
        elapsed = time.time() - t_loop
        progress = elapsed / budget
        if progress >= 1.0 or (args.max_steps is not None and step >= args.max_steps):
            break
        lr = lr_at(step, progress, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type=dev, dtype=amp, enabled=dev == "cuda"):
            logits = model(input_ids=x, use_cache=False).logits
        lt = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                             reduction="none")
        loss = lt.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        with torch.no_grad():
            ms = m[:, 1:].flatten()
            syn_tokens += batch_syn
            acc["loss"] += loss.detach()
            acc["syn"] += (lt * ms).sum().detach()
            acc["nsyn"] += ms.sum().detach()
            acc["cor"] += (lt * ~ms).sum().detach()
            acc["ncor"] += (~ms).sum().detach()
            acc["gn"] += gn.detach()
            acc["n"] += 1
        if step % args.log_every == 0 or step == 1:
            n = acc["n"]
            rec = {"step": step, "time": round(time.time() - t_loop, 2), "tokens": tokens,
                   "loss": round(float(acc["loss"]) / n, 4),
                   "loss_synthetic": round(float(acc["syn"]) / max(1, int(acc["nsyn"])), 4),
                   "loss_corpus": round(float(acc["cor"]) / max(1, int(acc["ncor"])), 4),
                   "lr": lr, "grad_norm": round(float(acc["gn"]) / n, 3),
                   "tok_per_s": round(tokens / max(1e-6, time.time() - t_loop)),
                   "synthetic_frac": round(syn_tokens / tokens, 4),
                   "data_wait_s": round(wait_data, 2)}
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            print(json.dumps(rec), flush=True)
            acc = {k: 0 for k in acc}
    train_s = time.time() - t_loop
    log_f.close()
    print(f"trained {step} steps, {tokens:,} tokens in {train_s:.1f}s", flush=True)
    del it, dl

    import transformers
    info = {
        "steps": step, "tokens": tokens, "synthetic_tokens": syn_tokens,
        "train_seconds": round(train_s, 1), "tok_per_s": round(tokens / train_s),
        "parameters": n_params, "batch": args.batch, "seq_len": args.seq, "lr": args.lr,
        "min_lr_frac": args.min_lr_frac, "warmup": args.warmup, "weight_decay": args.wd,
        "syn_seq_frac": args.syn_frac, "task_weights": weights, "workers": args.workers,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "corpus_tokens": n_corpus, "data_wait_s": round(wait_data, 2),
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0],
    }
    model.eval()
    t_save = time.time()
    # with --pack only the shards and one archive go to --out
    model_dir = Path(tempfile.mkdtemp(prefix="kascade_tiny_")) / "model" if args.pack else out / "model"
    save_model(model, tok_dir, model_dir)  # weights first: they survive a late interruption
    if args.pack:
        pack(model_dir, out)
    info["save_seconds"] = round(time.time() - t_save, 1)
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")

    from . import HELDOUT_PATH
    from .evaluate import retrieval, summary
    from .synthetic import StringSource

    ev: dict = {"niah_single": [], "vt": []}
    essay = StringSource(HELDOUT_PATH.read_text(encoding="utf-8"))
    per = args.eval_seconds / 3
    amp_eval = torch.bfloat16 if dev == "cuda" else None
    if args.eval_samples > 0:
        for L in (4096, 8192):
            r = retrieval(model, tok, "niah_single", L, args.eval_samples, essay, dev, amp_eval,
                          time_limit=per)
            ev["niah_single"].append(r)
            print(f"niah_single@{L}: {r['accuracy']:.3f} (n={r['n']}, {r['seconds']:.1f}s)", flush=True)
        r = retrieval(model, tok, "vt", 8192, args.eval_samples, essay, dev, amp_eval,
                      haystacks=("filler",), n_chains=1, n_hops=4, time_limit=per)
        ev["vt"].append(r)
        print(f"vt@8192: {r['accuracy']:.3f} recall {r['recall']:.3f} (n={r['n']}, {r['seconds']:.1f}s)",
              flush=True)
    info["eval"] = summary(ev)
    info["eval_detail"] = ev
    info["total_seconds"] = round(time.time() - t_start, 1)
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "eval_detail"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
