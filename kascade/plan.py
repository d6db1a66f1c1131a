"""Plan: which layers are anchors, which anchor KV head each reuse KV head borrows, and the budget.

A plan is made once per model (by `kascade.calibrate`) and read by every integration. On disk it is
a human-readable JSON file:

    {"schema_version": 1,
     "model": {"num_layers": 32, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, ...},
     "anchors": [0, 2, 8, 13, 14],
     "head_map": [[0, 1, ...], ...],        # one list of KV-head indices per layer; null = identity
     "rho": 0.1, "k_min": 128, "tile": 32,
     "provenance": {"data": ..., "num_prompts": ..., "prompt_tokens": ..., "date": ..., "kascade_version": ...}}

Layer l (not an anchor) reuses the anchor a(l) = max{a in anchors: a < l}; its KV head h attends to
the keys the anchor selected for KV head head_map[l][h]. Anchors' own rows of head_map are identity.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kascade.budget import check_budget

SCHEMA_VERSION = 1


def model_fingerprint(config) -> dict:
    """The shapes a plan depends on, read from a transformers config (its text config if nested)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": cfg.num_hidden_layers,
        "num_q_heads": heads,
        "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
    }


@dataclass
class Plan:
    """Anchors, head map and budget for one model. See the module docstring for the fields."""

    anchors: list[int]
    head_map: list[list[int]] | None = None
    rho: float = 0.1
    k_min: int = 128
    tile: int = 32
    model: dict | None = None
    provenance: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        self.anchors = [int(a) for a in self.anchors]
        if self.head_map is not None:
            self.head_map = [[int(x) for x in row] for row in self.head_map]
        self.check()

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int | None:
        if self.model is not None:
            return self.model["num_layers"]
        return len(self.head_map) if self.head_map is not None else None

    def anchor_of(self, layer: int) -> int:
        """The anchor whose indices layer `layer` uses (itself for an anchor)."""
        return max(a for a in self.anchors if a <= layer)

    def is_anchor(self, layer: int) -> bool:
        return layer in self.anchors

    def kv_head_map(self, layer: int, num_kv_heads: int) -> list[int]:
        """KV-head map of `layer` (identity when the plan has none)."""
        if self.head_map is None or self.is_anchor(layer):
            return list(range(num_kv_heads))
        return self.head_map[layer]

    # -- checks --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError for a plan that is inconsistent in itself."""
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version: expected {SCHEMA_VERSION}, got {self.schema_version}; "
                             "re-run `kascade calibrate` with this version")
        check_budget(self.rho, self.k_min)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile: expected an integer >= 1, got {self.tile!r}")
        if not self.anchors or self.anchors[0] != 0:
            raise ValueError(f"anchors: expected a list starting with layer 0 (always dense and an anchor), "
                             f"got {self.anchors}")
        if any(b <= a for a, b in zip(self.anchors, self.anchors[1:])):
            raise ValueError(f"anchors: expected strictly increasing layer indices, got {self.anchors}")
        n = self.num_layers
        if n is not None and self.anchors[-1] >= n:
            raise ValueError(f"anchors: expected layers in [0, {n}), got {self.anchors}")
        if self.head_map is not None:
            if n is not None and len(self.head_map) != n:
                raise ValueError(f"head_map: expected one row per layer ({n}), got {len(self.head_map)} rows")
            widths = {len(r) for r in self.head_map}
            if len(widths) != 1:
                raise ValueError(f"head_map: expected rows of equal length (KV heads), got lengths {sorted(widths)}")
            hkv = widths.pop()
            if self.model is not None and hkv != self.model["num_kv_heads"]:
                raise ValueError(f"head_map: expected {self.model['num_kv_heads']} KV heads per row, got {hkv}")
            for layer, row in enumerate(self.head_map):
                if any(x < 0 or x >= hkv for x in row):
                    raise ValueError(f"head_map: layer {layer} has values outside [0, {hkv}): {row}")
                if layer in self.anchors and row != list(range(hkv)):
                    raise ValueError(f"head_map: anchor layer {layer} must map heads to themselves, got {row}")

    def validate(self, model_config) -> None:
        """Raise ValueError unless this plan fits the model of `model_config`."""
        fp = model_fingerprint(model_config)
        if self.model is not None:
            diff = {k: (self.model.get(k), fp[k]) for k in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim")
                    if self.model.get(k) != fp[k]}
            if diff:
                detail = ", ".join(f"{k}: plan {a}, model {b}" for k, (a, b) in diff.items())
                raise ValueError(f"plan: made for another model ({detail}); calibrate a plan for this model "
                                 "with `kascade calibrate`")
        if self.anchors[-1] >= fp["num_layers"]:
            raise ValueError(f"anchors: expected layers in [0, {fp['num_layers']}), got {self.anchors}")
        if self.head_map is not None:
            if len(self.head_map) != fp["num_layers"] or len(self.head_map[0]) != fp["num_kv_heads"]:
                raise ValueError(f"head_map: expected {fp['num_layers']} rows of {fp['num_kv_heads']} KV heads, "
                                 f"got {len(self.head_map)} rows of {len(self.head_map[0])}")

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def for_model(cls, model_config, anchors, head_map=None, **kw) -> Plan:
        """A plan stamped with the model's fingerprint (and checked against it)."""
        plan = cls(anchors=list(anchors), head_map=head_map, model=model_fingerprint(model_config), **kw)
        plan.validate(model_config)
        return plan

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        known = {"anchors", "head_map", "rho", "k_min", "tile", "model", "provenance", "schema_version"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"plan: unknown fields {sorted(unknown)}; expected only {sorted(known)}")
        if "anchors" not in d:
            raise ValueError("plan: missing field 'anchors'")
        return cls(**d)

    def save(self, path) -> None:
        """Write JSON atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"plan: no file at {path}; make one with `kascade calibrate MODEL_DIR --data FILE -o {path}`")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"plan: {path} is not valid JSON ({e})") from e
        return cls.from_dict(d)


def uniform_anchors(num_layers: int, num_anchors: int) -> list[int]:
    """`num_anchors` evenly spaced layers starting at 0 (the uniform-anchors baseline)."""
    if not 1 <= num_anchors <= num_layers:
        raise ValueError(f"num_anchors: expected 1..{num_layers}, got {num_anchors}")
    return sorted({round(i * num_layers / num_anchors) for i in range(num_anchors)})
