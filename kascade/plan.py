"""Plan: which layers are anchors, which anchor KV head each reuse KV head borrows, and the budget.

A plan is made once per model (by `kascade.calibrate`) and read by every integration. On disk it is
a human-readable JSON file:

    {"schema_version": 2,
     "model": {"num_layers": 32, "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128, ...},
     "anchors": [0, 2, 8, 13, 14],
     "head_map": [[0, 1, ...], ...],        # one list of KV-head indices per layer; null = identity
     "head_sources": null,                  # finer-grained anchors (below); null = layer granularity
     "rho": 0.1, "k_min": 128, "tile": 32,
     "tp_degree": 1,                        # the map stays inside shards of this many ranks (optional)
     "recipe": "paper",                     # how it was calibrated: "paper" or "output-aware"
     "selecting_layers_equivalent": 5.0,    # selecting KV heads / Hkv, summed over layers
     "provenance": {"data": ..., "num_prompts": ..., "prompt_tokens": ..., "date": ..., "kascade_version": ...}}

Layer granularity (the paper; every schema-1 plan): layer l (not an anchor) reuses the anchor
a(l) = max{a in anchors: a < l}; its KV head h attends to the keys the anchor selected for KV head
head_map[l][h]. Anchors' own rows of head_map are identity.

Head granularity (`head_sources`, schema 2): anchors still select for every KV head; every other layer
has a row of one entry per KV head: null means that (layer, head) selects its own top-k (a
"head anchor"), [a, m] means it attends to the keys selected by KV head m of an earlier layer a, which
must itself select (an anchor, or a head anchor). head_map is then null. Such a layer costs the
selection of its selecting heads only, so the plan's cost is `selecting_layers_equivalent` =
sum over layers of (selecting KV heads / Hkv); for a layer-granular plan it is the number of anchors.

Tensor parallelism: with TP ranks, rank r holds the contiguous block of KV heads
[r * Hkv/TP, (r+1) * Hkv/TP). A plan calibrated with `tp_degree` maps every head inside its own block,
so each rank runs Kascade on its heads alone; a head-granular plan runs so when every source head lies in
its head's block (layers may differ). A map that stays inside blocks of TP also does inside blocks of any
divisor of TP; `validate(config, tp_degree=...)` checks the map (or the sources) itself.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kascade.budget import check_budget
from kascade.tp import default_tp_rank

SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)  # versions this code reads; 1 has no head_sources, recipe or cost field
RECIPES = ("paper", "output-aware")


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
    tp_degree: int = 1
    schema_version: int = SCHEMA_VERSION
    head_sources: list | None = None
    recipe: str = "paper"
    selecting_layers_equivalent: float | None = None

    def __post_init__(self):
        self.anchors = [int(a) for a in self.anchors]
        if self.head_map is not None:
            self.head_map = [[int(x) for x in row] for row in self.head_map]
        if self.head_sources is not None:
            self.head_sources = [None if row is None else
                                 [None if e is None else [int(e[0]), int(e[1])] for e in row]
                                 for row in self.head_sources]
        self.check()
        cost = self._selecting_equivalent()
        if self.selecting_layers_equivalent is None and cost is not None:
            self.selecting_layers_equivalent = cost
        elif cost is not None and abs(float(self.selecting_layers_equivalent) - cost) > 1e-9:
            raise ValueError(f"selecting_layers_equivalent: the plan's anchors and head sources give {cost}, "
                             f"the file says {self.selecting_layers_equivalent}; remove the field or fix it")

    # -- structure ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int | None:
        if self.model is not None:
            return self.model["num_layers"]
        return len(self.head_map) if self.head_map is not None else None

    def anchor_of(self, layer: int) -> int:
        """The anchor whose indices layer `layer` uses (itself for an anchor); layer granularity."""
        return max(a for a in self.anchors if a <= layer)

    @property
    def head_granular(self) -> bool:
        """True when some reuse layer takes keys per head from several layers or selects in part."""
        return self.head_sources is not None

    def require_layer_granular(self, what: str) -> None:
        """ValueError for a head-granular plan in a path that supports layer granularity only."""
        if self.head_granular:
            raise ValueError(f"plan: {what} supports plans of layer granularity only (anchors and a head map); this "
                             "plan has head_sources (finer-grained anchors). Use the transformers integration "
                             "(kascade.enable), or calibrate a layer-granular plan (`kascade calibrate --recipe output-aware "
                             "--granularity layer`, or `--recipe paper`)")

    def sources(self, layer: int, num_kv_heads: int, tp_rank: int | None = None) -> list[tuple[int, int]]:
        """Per KV head of `layer`, the (layer, head) whose selection it attends to; (layer, h) itself
        when the head selects. Layer 0 and anchors select for every head.

        `num_kv_heads` below the plan's count means one tensor-parallel shard (see `shard`): the rank's
        heads, their sources re-based to its local head numbers (layers unchanged)."""
        if self.is_anchor(layer):
            return [(layer, h) for h in range(num_kv_heads)]
        if self.head_sources is None:
            a = self.anchor_of(layer)
            return [(a, m) for m in self.kv_head_map(layer, num_kv_heads, tp_rank=tp_rank)]
        row = self.head_sources[layer]
        tp, rank = self.shard(num_kv_heads, tp_rank)
        if tp > 1:
            row = local_head_sources(row, tp, rank, layer)
        return [(layer, h) if e is None else (e[0], e[1]) for h, e in enumerate(row)]

    def selecting_heads(self, layer: int, num_kv_heads: int, tp_rank: int | None = None) -> list[int]:
        """The KV heads of `layer` that select their own top-k (all for an anchor)."""
        return [h for h, (a, _) in enumerate(self.sources(layer, num_kv_heads, tp_rank)) if a == layer]

    def used_by_later_layers(self, layer: int, num_kv_heads: int, tp_rank: int | None = None) -> bool:
        """Whether a later layer attends to this anchor's selection (layer 0 skips selecting otherwise)."""
        if self.head_sources is None:  # the layers after an anchor, up to the next anchor, reuse it
            return layer + 1 not in self.anchors
        return any(a == layer for b in range(layer + 1, len(self.head_sources))
                   for a, _ in self.sources(b, num_kv_heads, tp_rank))

    def shard(self, num_kv_heads: int, tp_rank: int | None = None) -> tuple[int, int]:
        """(TP degree, rank) of a caller holding `num_kv_heads` of the plan's KV heads: (1, 0) when it holds
        all of them (or the plan names no heads); below the plan's count, one tensor-parallel shard of
        Hkv / num_kv_heads ranks, rank `tp_rank`, or when None the torch.distributed rank modulo the TP
        degree (TP innermost in the process layout, as in transformers' device mesh)."""
        hkv = self._num_kv_heads_named()
        if hkv is None or num_kv_heads == hkv:
            return 1, 0
        if num_kv_heads < 1 or hkv % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected the plan's {hkv} KV heads or a shard of them (a divisor), "
                             f"got {num_kv_heads}")
        tp = hkv // num_kv_heads
        rank = default_tp_rank(tp) if tp_rank is None else tp_rank
        _rank_block(hkv, tp, rank)  # a valid rank
        return tp, rank

    def _num_kv_heads_named(self) -> int | None:
        """The KV heads of the plan's head map or head sources; None when it has neither."""
        if self.head_map is not None:
            return len(self.head_map[0])
        if self.head_sources is not None:
            return len(next(r for r in self.head_sources if r is not None))
        return None

    def _selecting_equivalent(self) -> float | None:
        if self.head_sources is None:
            return float(len(self.anchors))
        hkv = len(next(r for r in self.head_sources if r is not None))
        own = sum(1 for row in self.head_sources if row is not None for e in row if e is None)
        return len(self.anchors) + own / hkv

    def is_anchor(self, layer: int) -> bool:
        return layer in self.anchors

    def kv_head_map(self, layer: int, num_kv_heads: int, tp_rank: int | None = None) -> list[int]:
        """KV-head map of `layer` (identity when the plan has none).

        `num_kv_heads` below the plan's count means the caller holds one tensor-parallel shard of
        Hkv / num_kv_heads ranks: the map is then the rank's rows, re-based to its local heads (the
        rank as in `shard`)."""
        if self.head_sources is not None and not self.is_anchor(layer):
            srcs = self.sources(layer, num_kv_heads, tp_rank)
            if len({a for a, _ in srcs}) != 1 or srcs[0][0] != self.anchor_of(layer):
                self.require_layer_granular("a single head map per layer")
            return [m for _, m in srcs]
        if self.head_map is None or self.is_anchor(layer):
            return list(range(num_kv_heads))
        tp, rank = self.shard(num_kv_heads, tp_rank)
        if tp == 1:
            return self.head_map[layer]
        return local_head_map(self.head_map[layer], tp, rank, layer=layer)

    # -- checks --------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise ValueError for a plan that is inconsistent in itself."""
        if self.schema_version not in SCHEMA_VERSIONS:
            raise ValueError(f"schema_version: expected one of {SCHEMA_VERSIONS}, got {self.schema_version}; "
                             "re-run `kascade calibrate` with this version")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: expected one of {RECIPES}, got {self.recipe!r}")
        check_budget(self.rho, self.k_min)
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"tile: expected an integer >= 1, got {self.tile!r}")
        if isinstance(self.tp_degree, bool) or not isinstance(self.tp_degree, int) or self.tp_degree < 1:
            raise ValueError(f"tp_degree: expected an integer >= 1, got {self.tp_degree!r}")
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
            check_tp_degree(self.head_map, self.tp_degree, what="tp_degree")
        elif self.model is not None and self.head_sources is None:
            check_tp_degree(None, self.tp_degree, num_kv_heads=self.model["num_kv_heads"], what="tp_degree")
        if self.head_sources is not None:
            self._check_head_sources()

    def _check_head_sources(self) -> None:
        if self.schema_version < 2:
            raise ValueError(f"head_sources: needs schema_version 2, got {self.schema_version}")
        if self.head_map is not None:
            raise ValueError("head_map: expected null when head_sources is given (the sources name every head)")
        rows = self.head_sources
        n = self.num_layers if self.model is not None else len(rows)
        if len(rows) != n:
            raise ValueError(f"head_sources: expected one row per layer ({n}), got {len(rows)} rows")
        widths = {len(r) for r in rows if r is not None}
        if len(widths) != 1:
            raise ValueError(f"head_sources: expected rows of one width (KV heads) on the non-anchor layers, got "
                             f"widths {sorted(widths) or 'none'}")
        hkv = widths.pop()
        if self.model is not None and hkv != self.model["num_kv_heads"]:
            raise ValueError(f"head_sources: expected {self.model['num_kv_heads']} KV heads per row, got {hkv}")
        for layer, row in enumerate(rows):
            if (row is None) != (layer in self.anchors):
                want = "null (anchors select for every head)" if layer in self.anchors else "a row of sources"
                raise ValueError(f"head_sources: layer {layer} expected {want}, got {row}")
            for h, e in enumerate(row or ()):
                if e is None:
                    continue
                a, m = e
                if not (0 <= a < layer and 0 <= m < hkv):
                    raise ValueError(f"head_sources: layer {layer} head {h} takes [{a}, {m}]; expected an earlier "
                                     f"layer in [0, {layer}) and a KV head in [0, {hkv})")
                if not (a in self.anchors or rows[a][m] is None):
                    raise ValueError(f"head_sources: layer {layer} head {h} takes layer {a} head {m}, which does not "
                                     "select (it is neither an anchor nor a selecting head)")
        check_tp_degree(None, self.tp_degree, num_kv_heads=hkv, what="tp_degree", head_sources=rows)

    def validate(self, model_config, tp_degree: int | None = None) -> None:
        """Raise ValueError unless this plan fits the model of `model_config`, run on `tp_degree`
        tensor-parallel ranks when given (KV heads divisible by it, head map or head sources inside its
        shards)."""
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
        if self.head_sources is not None:
            width = len(next(r for r in self.head_sources if r is not None))
            if len(self.head_sources) != fp["num_layers"] or width != fp["num_kv_heads"]:
                raise ValueError(f"head_sources: expected {fp['num_layers']} rows of {fp['num_kv_heads']} KV heads, "
                                 f"got {len(self.head_sources)} rows of {width}")
        if self.head_map is not None:
            if len(self.head_map) != fp["num_layers"] or len(self.head_map[0]) != fp["num_kv_heads"]:
                raise ValueError(f"head_map: expected {fp['num_layers']} rows of {fp['num_kv_heads']} KV heads, "
                                 f"got {len(self.head_map)} rows of {len(self.head_map[0])}")
        if tp_degree is not None:
            check_tp_degree(self.head_map, tp_degree, num_kv_heads=fp["num_kv_heads"], head_sources=self.head_sources)

    # -- construction and files ----------------------------------------------------------------
    @classmethod
    def for_model(cls, model_config, anchors, head_map=None, **kw) -> Plan:
        """A plan stamped with the model's fingerprint (and checked against it)."""
        plan = cls(anchors=list(anchors), head_map=head_map, model=model_fingerprint(model_config), **kw)
        plan.validate(model_config)
        return plan

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.schema_version == 1:  # an old plan is written back as it was read
            for key in ("head_sources", "recipe", "selecting_layers_equivalent"):
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        known = {"anchors", "head_map", "rho", "k_min", "tile", "model", "provenance", "tp_degree", "schema_version",
                 "head_sources", "recipe", "selecting_layers_equivalent"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"plan: unknown fields {sorted(unknown)}; expected only {sorted(known)}")
        if "anchors" not in d:
            raise ValueError("plan: missing field 'anchors'")
        if d.get("schema_version", 1) == 1 and set(d) & {"head_sources", "recipe", "selecting_layers_equivalent"}:
            raise ValueError("plan: schema_version 1 has no head_sources, recipe or selecting_layers_equivalent; "
                             "set schema_version 2")
        return cls(**{"schema_version": 1, **d})

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


def shard_of(head: int, num_kv_heads: int, tp_degree: int) -> int:
    """The rank holding KV head `head` when `num_kv_heads` are split in contiguous blocks over `tp_degree`."""
    return head // (num_kv_heads // tp_degree)


# both recipes calibrate for a TP degree (their sources then stay inside the shards)
_TP_FIX = ("use a plan whose sources stay inside the shards: `kascade calibrate --tp-degree {tp}` (either recipe), "
           "or run without tensor parallelism")


def crossing_heads(head_map, tp_degree: int) -> list[tuple[int, int, int]]:
    """(layer, head, mapped head) for every entry of `head_map` that leaves its head's shard."""
    if head_map is None:
        return []
    hkv = len(head_map[0])
    return [(layer, h, m) for layer, row in enumerate(head_map) for h, m in enumerate(row)
            if shard_of(h, hkv, tp_degree) != shard_of(m, hkv, tp_degree)]


def crossing_sources(head_sources, tp_degree: int) -> list[tuple[int, int, int, int]]:
    """(layer, head, source layer, source head) for every entry of `head_sources` that leaves its head's shard."""
    if head_sources is None:
        return []
    hkv = len(next(r for r in head_sources if r is not None))
    return [(layer, h, e[0], e[1]) for layer, row in enumerate(head_sources) for h, e in enumerate(row or ())
            if e is not None and shard_of(h, hkv, tp_degree) != shard_of(e[1], hkv, tp_degree)]


def check_tp_degree(head_map, tp_degree, num_kv_heads: int | None = None, what: str = "tp_degree",
                    head_sources=None) -> None:
    """ValueError unless `tp_degree` divides the KV heads and `head_map` / `head_sources` stay inside its shards."""
    if isinstance(tp_degree, bool) or not isinstance(tp_degree, int) or tp_degree < 1:
        raise ValueError(f"{what}: expected an integer >= 1, got {tp_degree!r}")
    hkv = len(head_map[0]) if head_map else num_kv_heads
    if hkv is None:
        return
    if hkv % tp_degree:
        raise ValueError(f"{what}: the model's {hkv} KV heads do not split over {tp_degree} tensor-parallel ranks; "
                         f"use a TP degree dividing {hkv}")
    size = hkv // tp_degree
    bad = crossing_heads(head_map, tp_degree)
    if bad:
        layer, h, m = bad[0]
        raise ValueError(f"head_map: crosses tensor-parallel shards at TP degree {tp_degree} ({len(bad)} entries; "
                         f"first: layer {layer} KV head {h} on rank {h // size} reuses head {m} on rank {m // size}); "
                         f"re-calibrate with `kascade calibrate --tp-degree {tp_degree}` (or a multiple of it)")
    bad = crossing_sources(head_sources, tp_degree)
    if bad:
        layer, h, a, m = bad[0]
        raise ValueError(f"head_sources: crosses tensor-parallel shards at TP degree {tp_degree} ({len(bad)} entries; "
                         f"first: layer {layer} KV head {h} on rank {h // size} takes layer {a} head {m} on rank "
                         f"{m // size}); {_TP_FIX.format(tp=tp_degree)}")


def _rank_block(hkv: int, tp_degree: int, rank) -> tuple[int, int]:
    """(first KV head, number of KV heads) of rank `rank`'s shard; ValueError for a bad degree or rank."""
    check_tp_degree(None, tp_degree, num_kv_heads=hkv)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < tp_degree:
        raise ValueError(f"tp_rank: expected an integer in [0, {tp_degree}), got {rank!r}")
    size = hkv // tp_degree
    return rank * size, size


def local_head_map(row: list[int], tp_degree: int, rank: int, layer: int | None = None) -> list[int]:
    """Rank `rank`'s slice of one head-map row (of layer `layer`), re-based to its local KV heads
    0 .. Hkv/TP - 1. ValueError if a head of the slice maps outside the rank's shard."""
    lo, size = _rank_block(len(row), tp_degree, rank)
    local = [m - lo for m in row[lo : lo + size]]
    if any(not 0 <= m < size for m in local):
        where = "" if layer is None else f" of layer {layer}"
        raise ValueError(f"head_map: the row{where} {row} crosses tensor-parallel shards at TP degree {tp_degree} "
                         f"(rank {rank} holds KV heads [{lo}, {lo + size})); re-calibrate with "
                         f"`kascade calibrate --tp-degree {tp_degree}`")
    return local


def local_head_sources(row: list, tp_degree: int, rank: int, layer: int) -> list:
    """Rank `rank`'s slice of layer `layer`'s head_sources row (null, or [source layer, source head] per KV
    head), source heads re-based to its local KV heads 0 .. Hkv/TP - 1 (layers unchanged). ValueError
    naming the first entry whose source lies outside the rank's shard."""
    lo, size = _rank_block(len(row), tp_degree, rank)
    local = []
    for h in range(lo, lo + size):
        e = row[h]
        if e is not None and not lo <= e[1] < lo + size:
            raise ValueError(f"head_sources: layer {layer} KV head {h} on rank {rank} takes layer {e[0]} head {e[1]} "
                             f"on rank {e[1] // size}, across tensor-parallel shards at TP degree {tp_degree}; "
                             f"{_TP_FIX.format(tp=tp_degree)}")
        local.append(None if e is None else [e[0], e[1] - lo])
    return local


def uniform_anchors(num_layers: int, num_anchors: int) -> list[int]:
    """`num_anchors` evenly spaced layers starting at 0 (the uniform-anchors baseline)."""
    if not 1 <= num_anchors <= num_layers:
        raise ValueError(f"num_anchors: expected 1..{num_layers}, got {num_anchors}")
    return sorted({round(i * num_layers / num_anchors) for i in range(num_anchors)})
