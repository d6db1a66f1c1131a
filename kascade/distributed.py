"""Kascade under tensor parallelism: attention heads sharded over ranks.

With TP ranks, rank r holds query heads [r * Hq/TP, (r+1) * Hq/TP) and KV heads
[r * Hkv/TP, (r+1) * Hkv/TP): contiguous blocks, the layout of transformers' `tp_plan="auto"`
(q/k/v_proj colwise, o_proj rowwise) and of serving engines. Each KV head's G query heads sit on
its rank, so anchor selection (per KV head) is local. Reuse moves index sets between KV heads
through the head map; a plan calibrated with `tp_degree` (`kascade calibrate --tp-degree TP`) maps
every head inside its own block, so reuse is local too and no rank ever needs another's indices. A
head-granular plan (`head_sources`) runs sharded the same way when every source head lies in its head's
block (the source layers may be any); one that crosses is refused, naming the first crossing entry.

    # each rank (torchrun), after model = AutoModelForCausalLM.from_pretrained(dir, tp_plan="auto")
    import kascade.distributed
    plan = Plan.load("plan-tp2.json")
    with kascade.distributed.enable(model, plan):     # detects TP degree and rank from the model
        out = model.generate(ids, max_new_tokens=32)

`kascade.enable(model, plan)` works as well: the strategy sees Hkv/TP local KV heads and takes the
rank's rows of the head map or head sources (rank = torch.distributed rank modulo TP). `ShardedKascadeStrategy`
is the explicit form for any other sharded attention: it runs the plan on one rank's heads.

Why a constrained map and not an exchange of indices: an all-gather of every anchor's index sets
would sit on the critical path of every anchor layer (decode step latency is dominated by small
collectives), hold all ranks' index sets on each rank, and tie the reuse layers to a collective.
Restricting the argmax to the shard costs accuracy only where the best anchor head lives on
another rank; calibration reports that loss (`report["tp"]`). On kascade-tiny (4 KV heads) TP=2 loses
0.5% of the anchor objective and 0.019 of mean best-head coverage; TP=4 (no remap left) 1.3% / 0.051.
"""

from __future__ import annotations

import torch

from kascade.plan import Plan, check_tp_degree, local_head_map, local_head_sources
from kascade.strategy import KascadeStrategy, resolve_sparse_prefill
from kascade.tp import default_tp_rank


def head_slice(num_heads: int, tp_degree: int, rank: int) -> slice:
    """The heads rank `rank` holds: a contiguous block of num_heads / tp_degree."""
    if num_heads % tp_degree:
        raise ValueError(f"tp_degree: expected a divisor of the {num_heads} heads, got {tp_degree}")
    if not 0 <= rank < tp_degree:
        raise ValueError(f"rank: expected an integer in [0, {tp_degree}), got {rank}")
    size = num_heads // tp_degree
    return slice(rank * size, (rank + 1) * size)


def shard_heads(t: torch.Tensor, tp_degree: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s heads of `t` [B, H, N, D] -> [B, H/TP, N, D]."""
    return t[:, head_slice(t.shape[1], tp_degree, rank)]


def shard_plan(plan: Plan, tp_degree: int, rank: int) -> Plan:
    """The plan as one rank sees it: its KV heads only, head map or head sources re-based to local head
    numbers. ValueError naming head_map / head_sources and the first entry that crosses shards."""
    if plan.model is not None:
        check_tp_degree(plan.head_map, tp_degree, num_kv_heads=plan.model["num_kv_heads"],
                        head_sources=plan.head_sources)
    head_map = head_sources = None
    if plan.head_map is not None:
        head_map = [local_head_map(row, tp_degree, rank, layer=layer) for layer, row in enumerate(plan.head_map)]
    if plan.head_sources is not None:
        head_sources = [None if row is None else local_head_sources(row, tp_degree, rank, layer)
                        for layer, row in enumerate(plan.head_sources)]
    model = None
    if plan.model is not None:
        if plan.model["num_q_heads"] % tp_degree:
            raise ValueError(f"tp_degree: the model's {plan.model['num_q_heads']} query heads do not split over "
                             f"{tp_degree} ranks")
        model = {**plan.model, "num_q_heads": plan.model["num_q_heads"] // tp_degree,
                 "num_kv_heads": plan.model["num_kv_heads"] // tp_degree}
    return Plan(anchors=list(plan.anchors), head_map=head_map, head_sources=head_sources, rho=plan.rho,
                k_min=plan.k_min, tile=plan.tile, model=model, recipe=plan.recipe, schema_version=plan.schema_version,
                provenance={**plan.provenance, "tp_shard": {"rank": rank, "tp_degree": tp_degree}})


class ShardedKascadeStrategy(KascadeStrategy):
    """Kascade on one tensor-parallel rank's heads.

    `attend(layer, q, k, v, kv_start, scale)` takes the rank's heads, q [B, Hq/TP, Q, D] and
    k/v [B, Hkv/TP, N, D], and returns [B, Hq/TP, Q, Dv]: the rank's rows of the unsharded output
    (concatenating the ranks' outputs over heads gives the unsharded result exactly, the head map or
    head sources being inside shards). `validate(config)` checks the full plan against the full model config.
    """

    name = "kascade-tp"

    def __init__(self, plan: Plan, tp_degree: int, rank: int, backend: str = "auto",
                 dense_anchor_output: bool = False, sparse_prefill: bool = True, select_keys: str = "exact",
                 rerank: float | None = None):
        super().__init__(shard_plan(plan, tp_degree, rank), backend=backend, dense_anchor_output=dense_anchor_output,
                         sparse_prefill=sparse_prefill, select_keys=select_keys, rerank=rerank)
        self.full_plan, self.tp_degree, self.rank = plan, tp_degree, rank

    def validate(self, model_config) -> None:
        self.full_plan.validate(model_config, tp_degree=self.tp_degree)


def tp_layout(model) -> tuple[int, int]:
    """(TP degree, this process's TP rank) of a transformers model; (1, 0) when not tensor-parallel."""
    mesh = getattr(model, "_device_mesh", None)
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        tp_mesh = mesh["tp"] if "tp" in names else (mesh if mesh.ndim == 1 else None)
        if tp_mesh is not None:
            return tp_mesh.size(), tp_mesh.get_local_rank()
    degree = getattr(model, "_tp_size", None) or 1
    return (degree, default_tp_rank(degree)) if degree > 1 else (1, 0)


def enable(model, plan: Plan, backend: str = "auto", dense_anchor_output: bool = False,
           sparse_prefill: bool | None = None, select_keys: str = "exact", rerank: float | None = None):
    """`kascade.enable(model, plan)` for a model loaded with `tp_plan`: the plan is checked against the
    TP degree before the first forward, and each rank runs its shard (with select_keys="fp8" each rank keeps
    the FP8 copies of its own heads beside its cache). sparse_prefill as in kascade.enable (None: decode-only
    mode, kascade.strategy.DEFAULT_SPARSE_PREFILL). Returns the same handle."""
    from kascade.integrations.transformers import enable as _enable

    degree, rank = tp_layout(model)
    if degree == 1:
        return _enable(model, plan, backend=backend, dense_anchor_output=dense_anchor_output,
                       sparse_prefill=sparse_prefill, select_keys=select_keys, rerank=rerank)
    if not isinstance(plan, Plan):
        raise ValueError(f"plan: expected a kascade.Plan (Plan.load(path)), got {type(plan).__name__}")
    plan.validate(model.config, tp_degree=degree)
    strategy = ShardedKascadeStrategy(plan, degree, rank, backend=backend, dense_anchor_output=dense_anchor_output,
                                      sparse_prefill=resolve_sparse_prefill(sparse_prefill), select_keys=select_keys,
                                      rerank=rerank)
    return _enable(model, strategy=strategy)
