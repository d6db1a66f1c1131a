"""Which compiled variants the Triton kernels would need, recorded in Triton's CPU interpreter.

On a GPU every launch whose specialization key is new costs a compilation (seconds for the larger kernels).
The key is made of the constexpr values, the launch options (num_warps, ...), the dtypes of the tensors and,
for every argument not in the kernel's do_not_specialize, whether an int equals 1 or is divisible by 16 and
whether a tensor's address is 16-byte aligned. The interpreter compiles nothing, so `record()` recomputes that
key at each launch (as triton.runtime.jit does) and collects the distinct keys per kernel: a serving step whose
lengths change must not need a new one.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "launch_pdl", "launch_cooperative_grid")


def _spec(value, specialize: bool):
    """The part of the key an argument contributes (its type, and its value class when specialized)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        kind = "i64" if not -(2**31) <= value < 2**31 else "i32"
        if not specialize:
            return kind
        return (kind, 1 if value == 1 else 16 if value % 16 == 0 else 0)
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, torch.Tensor):
        return (str(value.dtype), value.data_ptr() % 16 == 0) if specialize else str(value.dtype)
    return type(value).__name__


def launch_key(fn, args, kwargs) -> tuple:
    """The specialization key of launching the interpreted kernel `fn` with (args, kwargs)."""
    sig = inspect.signature(fn.fn)
    options = tuple(sorted((k, kwargs[k]) for k in LAUNCH_OPTIONS if k in kwargs))
    call = {k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS}
    bound = sig.bind_partial(*args, **{k: v for k, v in call.items() if k in sig.parameters})
    bound.apply_defaults()
    names = list(sig.parameters)
    dns = fn.kwargs.get("do_not_specialize") or ()
    dns = {names[d] if isinstance(d, int) else d for d in dns}
    key = []
    for name, value in bound.arguments.items():
        ann = sig.parameters[name].annotation
        if "constexpr" in str(ann):
            key.append((name, value))
        else:
            key.append((name, _spec(value, name not in dns)))
    extra = tuple(sorted((k, v) for k, v in call.items() if k not in sig.parameters))  # autotune-like configs
    return tuple(key) + options + extra


@contextlib.contextmanager
def record():
    """Within the block, {kernel name: set of specialization keys} of every interpreted launch (yielded dict)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict[str, set] = {}
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen.setdefault(self.fn.__name__, set()).add(launch_key(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


def differing(keys: set) -> list[str]:
    """The argument names whose part of the key differs between the keys (what makes the variants)."""
    keys = list(keys)
    out = []
    for i, item in enumerate(keys[0]):
        name = item[0] if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else str(i)
        if any(k[i] != item for k in keys[1:] if i < len(k)):
            out.append(name)
    return out
