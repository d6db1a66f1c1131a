"""What benchmarks/vllm_gpu_check.py and benchmarks/vllm_serving.py share: vLLM runs as resumable "cells".

A cell is one vLLM engine configuration (model, plan, graph mode, workload) run in its own Python process
(vLLM frees a GPU reliably only with its process) that writes one JSON file. A driver runs the cells whose
file is missing, one after another, and stops before its time budget (a GPU call lasts at most 10
minutes), so a later call with the same work folder resumes where the last one stopped.

The Kascade plugin reaches vLLM through the `vllm.general_plugins` entry point, which needs package
metadata: on the GPU machine kascade is imported from the tree (PYTHONPATH), not installed, so
`install_entry_point` writes a minimal `.dist-info` (name, version, the entry point) into a folder on
sys.path. Each cell also calls kascade.integrations.vllm.register() itself and runs vLLM's engine in
process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the backend is registered in the process that builds the
model either way; `kascade_layers()` counts the attention layers that run Kascade, so a cell can prove it.

Nothing here imports torch or vllm at module import time (the scripts' --help works without them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from report_json import short_device_name  # the GPU's model in file names (device_info)

ROOT = Path(__file__).resolve().parents[1]
EP_DIR = Path(os.environ.get("KASCADE_EP_DIR", "/tmp/kascade-ep"))
ENTRY_POINT = "kascade = kascade.integrations.vllm:register"


def install_entry_point(folder: Path = EP_DIR) -> Path:
    """A `kascade_vllm_plugin-0.0.0.dist-info` in `folder` declaring the vllm.general_plugins entry point; the
    folder must be on PYTHONPATH of every process vLLM starts (the stage scripts export it)."""
    info = folder / "kascade_vllm_plugin-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kascade-vllm-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{ENTRY_POINT}\n")
    return folder


def engine_env() -> None:
    """Environment for an in-process vLLM engine with the Kascade plugin registered (call before importing vllm)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def register_plugin() -> None:
    from kascade.integrations.vllm import register

    register()


INIT_LOAD_FORMAT = "kascade-init"


def load_format(weights: str) -> str:
    """vLLM's load_format for a benchmark's --weights: "dummy" (vLLM's own: uniform in +-1e-3) or "init"
    (normal at the config's initializer_range, registered here under INIT_LOAD_FORMAT)."""
    if weights == "dummy":
        return "dummy"
    if weights != "init":
        raise ValueError(f"weights: expected 'dummy' or 'init', got {weights!r}")
    register_init_loader()
    return INIT_LOAD_FORMAT


def register_init_loader() -> None:
    """Register INIT_LOAD_FORMAT with vLLM (in this process): every weight matrix drawn from
    N(0, initializer_range^2) as transformers initializes Llama, norm scales 1, biases 0,
    nothing downloaded. vLLM's dummy weights (uniform in +-1e-3) make every query-key score nearly 0, so
    attention is flat, the top-k selection's worst case; these spread the scores as a freshly initialized model
    does (a trained one is more peaked still)."""
    import torch
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.dummy_loader import DummyModelLoader

    if getattr(register_init_loader, "done", False):
        return

    @register_model_loader(INIT_LOAD_FORMAT)
    class InitLoader(DummyModelLoader):
        def load_weights(self, model, model_config) -> None:
            std = float(getattr(model_config.hf_config, "initializer_range", 0.02))
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(model_config.seed or 0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 1:
                        p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                    else:
                        p.normal_(0.0, std, generator=gen)

    register_init_loader.done = True


def kascade_config(plan, select_keys: str = "exact") -> dict:
    """vLLM's additional_config for a plan file (None: none, vLLM unchanged). The benchmarks and checks run the
    paper's method, sparse prefill included (the plugin's default is decode-only mode), as their results say.
    select_keys "fp8": selections from the FP8 copy of the keys (kascade.fp8keys)."""
    if not plan:
        return {}
    extra = {} if select_keys == "exact" else {"kascade_select_keys": select_keys}
    return {"kascade_plan": str(plan), "kascade_sparse_prefill": True, **extra}


def kascade_layers() -> int:
    """Attention layers built with a plan in this process (KascadeFlashAttentionImpl / KascadeCPUImpl)."""
    import kascade.integrations.vllm as kv

    return kv.ACTIVE_LAYERS[0]


def _compiled_kernels(prefix: str):
    """(name "module.attr", JITFunction) of every Triton kernel under `prefix` that compiled in this process
    (an autotuner's or heuristics' kernel by the function it wraps)."""
    from triton.runtime.jit import JITFunction

    for name, mod in list(sys.modules.items()):
        if not name.startswith(prefix) or mod is None:
            continue
        for attr, fn in vars(mod).items():
            if not isinstance(fn, JITFunction):
                fn = getattr(fn, "fn", fn)
            if isinstance(fn, JITFunction) and fn.device_caches:
                yield f"{name.rsplit('.', 1)[-1]}.{attr}", fn


def triton_variants(prefix: str = "kascade.") -> dict:
    """{kernel name: compiled variants} of the Triton kernels in the loaded modules under `prefix`, in this
    process: how many specializations (shapes' divisibility, constexprs, dtypes) a run compiled; each one costs
    a compilation the first time it is met (seconds for the larger kernels)."""
    out = {}
    for name, fn in _compiled_kernels(prefix):
        count = sum(len(cache[0]) for cache in fn.device_caches.values())
        if count:
            out[name] = count
    return dict(sorted(out.items()))


def differing_parts(arg_names: list, keys: list) -> dict:
    """{argument name: its distinct parts (at most 8, as text)} over Triton cache keys (specialization tuple, options
    text): what made a kernel compile more than once. A key's specialization lists every argument in order, so
    position i is arg_names[i]; "options" when the launch options differ."""
    specs, opts = [k[0] for k in keys], {k[1] for k in keys}
    out = {}
    for i in range(max((len(s) for s in specs), default=0)):
        vals = {repr(s[i]) if i < len(s) else "-" for s in specs}
        if len(vals) > 1:
            out[arg_names[i] if i < len(arg_names) else str(i)] = sorted(vals)[:8]
    if len(opts) > 1:
        out["options"] = sorted(opts)[:8]
    return out


def triton_variant_differences(prefix: str = "kascade.") -> dict:
    """{kernel name: differing_parts} of the Triton kernels under `prefix` compiled more than once in this process."""
    out = {}
    for name, fn in _compiled_kernels(prefix):
        try:  # a diagnostic: Triton's cache layout may change, and must never fail a run
            keys = [k for cache in fn.device_caches.values() for k in cache[1]]  # (specialization, options)
            if len(keys) > 1:
                out[name] = differing_parts(list(fn.arg_names), keys)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": repr(e)}
    return dict(sorted(out.items()))


def device_info() -> dict:
    import datetime

    import torch

    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        info.update(device=name, device_short=short_device_name(name),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    else:
        info.update(device="cpu", device_short="cpu", memory_gib=None)
    for mod in ("vllm", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a version we cannot read is reported as missing
            info[mod] = None
    return info


def run_cells(cells: list[tuple[str, list[str]]], work: Path, budget_s: float, min_left_s: float,
              cell_timeout_s: float, script: Path, copy_to: Path | None = None) -> list[str]:
    """Run each (name, argv) whose `work/name.json` is missing as `python script argv --out work/name.json`,
    while at least `min_left_s` of `budget_s` is left; each cell's log goes to work/name.log (and both to
    copy_to). Returns the names still missing."""
    start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    missing = []
    for name, argv in cells:
        out = work / f"{name}.json"
        if out.exists():
            print(f"[cells] {name}: done before", flush=True)
            continue
        left = budget_s - (time.monotonic() - start)
        if left < min_left_s:
            print(f"[cells] {name}: not started ({left:.0f} s left of the budget)", flush=True)
            missing.append(name)
            continue
        log = work / f"{name}.log"
        t0 = time.monotonic()
        with open(log, "w") as fh:
            try:
                rc = subprocess.run([sys.executable, str(script), *argv, "--out", str(out)], stdout=fh,
                                    stderr=subprocess.STDOUT, timeout=min(cell_timeout_s, left - 10), cwd=ROOT).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        print(f"[cells] {name}: rc {rc} in {time.monotonic() - t0:.0f} s", flush=True)
        if copy_to is not None:
            copy_to.mkdir(parents=True, exist_ok=True)
            for f in (out, log):
                if f.exists():
                    (copy_to / f.name).write_bytes(f.read_bytes())
        if not out.exists():
            missing.append(name)
            print("".join(open(log).readlines()[-25:]), flush=True)
    return missing


def write_json(path, data) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1))


def write_report(stem: Path, data: dict, lines: list[str]) -> None:
    """A report's files: stem.json (data) and stem.md (lines); the table is printed too."""
    write_json(Path(stem).with_suffix(".json"), data)
    Path(stem).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def add_budget_arguments(parser, min_left_s: float) -> None:
    """The `run` stage's arguments shared by the cell scripts: --budget-s, --min-left-s, --copy-to."""
    parser.add_argument("--budget-s", type=float, default=540, help="stop starting cells after this (default %(default)s)")
    parser.add_argument("--min-left-s", type=float, default=min_left_s,
                        help="start a cell only with this much left (default %(default)s)")
    parser.add_argument("--copy-to", default=os.environ.get("OUT"), help="copy each cell's files here ($OUT)")


def load_cells(work: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(work).glob("*.json"))}
