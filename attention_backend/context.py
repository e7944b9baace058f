"""The explicit per-step context of the worker (as nano-vllm's `set_context` / `reset_context`).

The worker's `execute_model` sets it before vLLM runs a step and resets it in `finally`; the
attention builder and the layers read it, and nothing in it outlives the step: the policy in
force for the whole step, the process's per-request moment store and page summaries, the model
runner (the batch's request ids and prompt lengths) and the decisions the layers made, which the
worker counts once when the step ends (`StepDecisions`, one host sync per step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .moments import MomentStore
from .page_summaries import PageSummaries
from .policy import group_rule
from .reference import Observation
from .settings import ActivePolicy

NO_WORKER = (
    "QAdA needs its worker class to know the batch's requests: start vLLM with --worker-cls "
    "attention_backend.worker.QadaCPUWorker (GPU: attention_backend.gpu_worker.QadaGPUWorker); "
    "`qada serve` does"
)


@dataclass
class LayerDecisions:
    """One layer's decisions for the decode rows of a step."""

    layer: int
    req_ids: list[str]  # the decode rows' requests
    seq_lens: Tensor  # [rows]
    long_heads: Tensor  # [rows, Hq] bool
    long_groups: Tensor  # [rows, Hkv] bool
    token_bytes: int  # K + V bytes of one token of one KV head
    observation: Observation | None = None
    replayed: tuple[bool, ...] = ()  # per row: a resumed request's token decoded before
    kept_blocks: Tensor | None = None  # with page selection: [rows, Hkv] KV blocks long groups read
    block_size: int = 0  # of the KV cache, with page selection
    rank_bytes: int = 0  # with page_rank_dims: key bytes per context token a long group's ranking read
    copy_bytes: int = 0  # with page_rank_bits: key-copy bytes per context token a long group's ranking read


@dataclass
class StepDecisions:
    """A step's decisions, all layers side by side, on the host."""

    req_ids: list[str]
    layers: list[int]
    seq_lens: Tensor  # [rows] int64
    heads: Tensor  # [rows, layers, Hq] bool
    groups: Tensor  # [rows, layers, Hkv] bool
    token_bytes: int
    local_tokens: int  # t_sink + t_local: what a local group reads at most
    oracle_heads: Tensor | None = None  # with observe: [rows, layers, Hq]
    oracle_groups: Tensor | None = None  # [rows, layers, Hkv]
    top1: Tensor | None = None  # [rows, layers, Hq] int64
    replayed: tuple[bool, ...] = ()  # per row (empty: none): counted, but not again per request
    kept_blocks: Tensor | None = None  # with page selection: [rows, layers, Hkv] int64
    block_size: int = 0  # of the KV cache, with page selection
    rank_bytes: int = 0  # with page_rank_dims: key bytes per context token a long group's ranking read
    copy_bytes: int = 0  # with page_rank_bits: key-copy bytes per context token a long group's ranking read

    def tokens_read(self) -> Tensor:
        """[rows, layers, Hkv] int64: the tokens each KV group read: its whole context when long
        (with page selection, its kept blocks: all whole but the last), else its local set."""
        lengths = self.seq_lens.view(-1, 1, 1)
        long_tokens = lengths
        if self.kept_blocks is not None:
            long_tokens = (self.kept_blocks - 1) * self.block_size + (lengths - 1) % self.block_size + 1
        return torch.where(self.groups, long_tokens, lengths.clamp(max=self.local_tokens))

    def bytes_read(self) -> Tensor:
        """[rows, layers, Hkv] int64: the KV bytes each KV group read: its tokens', and with
        page_rank_dims the key dimensions its ranking read of the tokens it then skipped (those
        of the blocks it reads are read whole anyway)."""
        tokens = self.tokens_read()
        read = tokens * self.token_bytes
        if self.rank_bytes:
            skipped = self.seq_lens.view(-1, 1, 1) - tokens
            read = read + torch.where(self.groups, skipped * self.rank_bytes, 0)
        return read

    def key_copy_bytes_read(self) -> Tensor:
        """[rows, layers, Hkv] int64: with page_rank_bits, the bytes of the key copy (beside the
        KV cache, not in it) each long group's ranking read: its whole context's."""
        return torch.where(self.groups, self.seq_lens.view(-1, 1, 1) * self.copy_bytes, 0)

    def long_group_blocks(self) -> tuple[Tensor, Tensor] | None:
        """With page selection: per (row, layer, KV group) [rows, layers, Hkv], the KV blocks long
        groups read and skipped (0 for local groups); None without it."""
        if self.kept_blocks is None:
            return None
        blocks = (self.seq_lens.view(-1, 1, 1) - 1) // self.block_size + 1
        read = torch.where(self.groups, self.kept_blocks, 0)
        return read, torch.where(self.groups, blocks - self.kept_blocks, 0)

    @property
    def num_heads(self) -> int:
        return self.heads.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.groups.shape[2]


@dataclass
class StepContext:
    policy: ActivePolicy
    moments: MomentStore
    runner: object  # vLLM's (V1) model runner: its persistent `input_batch` is in batch order
    pages: PageSummaries  # the worker's: they outlive the step, like the moments
    decisions: list[LayerDecisions] = field(default_factory=list)
    written: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def written_chunks(self, slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
        """`pages.written(slot_mapping)`, computed once per step: every layer of a KV cache group
        writes through the same slot mapping (at 7k x 1 the per-layer ops cost ~3% of a step)."""
        key = (slot_mapping.data_ptr(), slot_mapping.numel())
        if key not in self.written:
            self.written[key] = self.pages.written(slot_mapping)
        return self.written[key]

    def batch_req_ids(self, num_rows: int) -> list[str]:
        """Ids of the first `num_rows` rows of the batch being built (batch order)."""
        return list(self._input_batch().req_ids[:num_rows])

    def num_prompt_tokens(self):
        """Prompt length of each batch row (array)."""
        return self._input_batch().num_prompt_tokens

    def num_tokens(self):
        """Tokens of each batch row so far, prompt and output (array)."""
        return self._input_batch().num_tokens_no_spec

    def _input_batch(self):
        batch = getattr(self.runner, "input_batch", None)
        if batch is None:
            raise RuntimeError(
                f"QAdA reads request ids from vLLM's V1 model runner, not {type(self.runner).__name__}: "
                "set VLLM_USE_V2_MODEL_RUNNER=0 (`qada serve` does)"
            )
        return batch

    def step_decisions(self) -> StepDecisions | None:
        """The layers' decisions stacked (None if no layer decoded this step)."""
        if not self.decisions:
            return None
        first = self.decisions[0]
        heads = torch.stack([d.long_heads for d in self.decisions], dim=1).cpu()
        groups = torch.stack([d.long_groups for d in self.decisions], dim=1).cpu()
        step = StepDecisions(
            req_ids=first.req_ids,
            layers=[d.layer for d in self.decisions],
            seq_lens=first.seq_lens.long().cpu(),
            heads=heads,
            groups=groups,
            token_bytes=first.token_bytes,
            local_tokens=self.policy.settings.t_sink + self.policy.settings.t_local,
            replayed=first.replayed,
        )
        if first.kept_blocks is not None:
            step.kept_blocks = torch.stack([d.kept_blocks for d in self.decisions], dim=1).cpu().long()
            step.block_size, step.rank_bytes = first.block_size, first.rank_bytes
            step.copy_bytes = first.copy_bytes
        if all(d.observation is not None for d in self.decisions):
            oracle = torch.stack([d.observation.oracle_long for d in self.decisions], dim=1).cpu()
            rows, layers, _ = oracle.shape
            step.oracle_heads = oracle
            step.oracle_groups = group_rule(oracle.flatten(0, 1), groups.shape[2]).view(rows, layers, -1)
            step.top1 = torch.stack([d.observation.top1 for d in self.decisions], dim=1).cpu()
        return step


_CONTEXT: StepContext | None = None


def set_step_context(context: StepContext) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_step_context() -> StepContext | None:
    """The running step's context; None outside a step (profile and warm-up runs)."""
    return _CONTEXT


def reset_step_context() -> None:
    global _CONTEXT
    _CONTEXT = None
