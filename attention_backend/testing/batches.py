"""Engine steps without an engine, for builder and impl tests: named batch specs in the style of
vLLM's tests/v1/attention, the `CommonAttentionMetadata` the model runner would build for them
over a paged cache, a stand-in runner holding the batch's requests, and the step context the
worker would set."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch
from vllm.v1.attention.backend import CommonAttentionMetadata

from ..context import StepContext
from ..moments import MomentStore
from ..page_summaries import PageSummaries
from ..policy_files import ModelShape, read_policy_files
from ..settings import ActivePolicy, QadaSettings

# SmolLM2-135M's dimensions, with the smallest block size the tests use (pages divide it)
TEST_SHAPE = ModelShape(
    num_layers=30, num_heads=9, num_kv_heads=3, head_size=64, max_model_len=8192, block_size=32, page_chunk=1
)


@dataclass
class BatchSpec:
    """One step, per request in batch order: its length after the step (`seq_lens`), the tokens
    the step computes for it (`query_lens`; 1 for a decode row) and its prompt length (default:
    a decode row's prompt ended before the step, a prefill row's prompt is its whole length)."""

    seq_lens: list[int]
    query_lens: list[int]
    prompt_lens: list[int] | None = None
    req_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.req_ids:
            self.req_ids = [f"req-{i}" for i in range(len(self.seq_lens))]
        if self.prompt_lens is None:
            self.prompt_lens = [n - q if q == 1 else n for n, q in zip(self.seq_lens, self.query_lens)]

    @property
    def num_decodes(self) -> int:
        return sum(q == 1 for q in self.query_lens)


# Decode rows first, as the builder asks vLLM to order them.
BATCH_SPECS = {
    "small_decode": BatchSpec(seq_lens=[32, 40], query_lens=[1, 1]),
    "long_decode": BatchSpec(seq_lens=[1200, 3000, 700], query_lens=[1, 1, 1]),
    "mixed": BatchSpec(seq_lens=[40, 300, 700, 20, 500], query_lens=[1, 1, 1, 20, 37]),  # fresh, chunked
    "prefill_only": BatchSpec(seq_lens=[20, 500], query_lens=[20, 37]),
}


def common_metadata(spec: BatchSpec, block_table: torch.Tensor, block_size: int) -> CommonAttentionMetadata:
    """What vLLM's model runner builds for `spec` over `block_table` [B, max_blocks] (CPU)."""
    query_start = torch.tensor([0, *torch.tensor(spec.query_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor(spec.seq_lens, dtype=torch.int32)
    slots = []
    for row, (n, q) in enumerate(zip(spec.seq_lens, spec.query_lens)):
        pos = torch.arange(n - q, n)
        slots.append(block_table[row, pos // block_size].long() * block_size + pos % block_size)
    return CommonAttentionMetadata(
        query_start_loc=query_start,
        query_start_loc_cpu=query_start,
        seq_lens=seq_lens,
        num_reqs=len(spec.seq_lens),
        num_actual_tokens=int(query_start[-1]),
        max_query_len=max(spec.query_lens),
        max_seq_len=max(spec.seq_lens),
        block_table_tensor=block_table,
        slot_mapping=torch.cat(slots),
        seq_lens_cpu_upper_bound=seq_lens,
    )


def stand_in_runner(spec: BatchSpec) -> SimpleNamespace:
    """A model runner whose persistent batch holds `spec`'s requests (what the builder reads)."""
    return SimpleNamespace(
        input_batch=SimpleNamespace(
            req_ids=list(spec.req_ids),
            num_prompt_tokens=list(spec.prompt_lens),
            num_tokens_no_spec=list(spec.seq_lens),
        )
    )


def step_context(
    spec: BatchSpec, settings: QadaSettings | dict, moments: MomentStore | None = None
) -> StepContext:
    """The context the worker sets for a step of `spec` under `settings`."""
    if isinstance(settings, dict):
        settings = QadaSettings(**settings)
    files = read_policy_files(settings, files_dir=None)  # static heads inline, as the API sends them
    # summaries stored at its page size, with its key copy
    shape = replace(TEST_SHAPE, page_chunk=settings.page_chunk, page_rank_bits=settings.page_rank_bits)
    policy = ActivePolicy.load(settings, shape, files)
    pages = PageSummaries(settings.page_chunk, settings.page_rank_bits)
    return StepContext(policy, moments or MomentStore(), stand_in_runner(spec), pages)
