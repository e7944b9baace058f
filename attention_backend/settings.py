"""The QAdA settings: one model for the `attention` section of a config, the body of
`PUT /v1/qada/policy`, the `qada serve` flags and what the worker applies.

`QadaSettings` is immutable: a policy change builds a new one and the worker swaps it in whole
(`ActivePolicy`, with the files it names loaded), between engine steps. What a policy needs from
the rest of the backend is asked through its properties (`needs_moments`, ...), never by
comparing policy names elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from .key_codes import KEY_BITS
from .policy import PolicyInputs, random_long_mask
from .policy_files import ModelShape, PolicyError, calib_tensors, static_heads_mask
from .ranks import RankShare

POLICIES = ("oracle", "qada", "static", "full", "local", "random")
STATS_SOURCES = ("pages", "pages_bound", "prompt", "calib", "local")
GROUP_RULES = ("any", "mean")
MAX_TOKENS = 2**24  # a bound on token counts before the model's own (`ModelShape.check`)


class QadaSettings(BaseModel):
    """QAdA's per-head long/local decision and what it reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal[POLICIES] = Field(  # type: ignore[valid-type]
        "qada", description="oracle, qada, static, full, local or random"
    )
    tau: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="threshold on the bulk's share of softmax mass (measured: docs/results.md)",
    )
    t_sink: int = Field(
        16, ge=0, le=MAX_TOKENS, description="sink tokens (the first positions) every head reads"
    )
    t_local: int = Field(128, ge=1, le=MAX_TOKENS, description="recent tokens every head reads")
    stats: Literal[STATS_SOURCES] = Field(  # type: ignore[valid-type]
        "pages",
        description="qada's key statistics: pages (per-page key mean and variance), pages_bound "
        "(per-page key min/max: an upper bound), prompt (one Gaussian of the bulk), calib or local",
    )
    page_chunk: int = Field(
        32,
        ge=1,
        le=MAX_TOKENS,
        description="tokens per page summary (divides the KV block size). The launch value is what "
        "is stored; a change later may only coarsen it (a multiple of the launch value)",
    )
    groups: Literal[GROUP_RULES] = Field(  # type: ignore[valid-type]
        "any",
        description="a KV group is read in full when any of its query heads is long, or (mean) when "
        "its heads' bulk shares average above tau",
    )
    page_budget: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="page selection (qada with page statistics, or oracle: exact masses; CPU): a "
        "long KV group reads, besides its sink and window blocks, only the bulk KV blocks with the "
        "highest estimated mass, the fewest that leave at most this estimated share of each of its "
        "heads' softmax mass unread; 0 reads the whole context",
    )
    page_top_k: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS,
        description="page selection with a fixed budget instead (as Quest): a long KV group reads "
        "its k bulk KV blocks of highest estimated mass; 0: off",
    )
    page_rank_dims: int = Field(
        0,
        ge=0,
        le=1024,
        description="page selection ranks KV blocks by partial scores on this many key dimensions "
        "(those where the group's queries are largest, as SparQ), read from the cache, instead of "
        "by the page statistics; 0: by the page statistics",
    )
    page_rank_layers: tuple[Annotated[int, Field(ge=0, le=4096)], ...] = Field(
        (),
        max_length=64,
        description="page selection ranks KV blocks in these layers (as TidalDecode's selection "
        "layers): such a layer reads every KV group in full and ranks each row's blocks by the "
        "largest exact share of mass any of its heads gives them; the layers after it, until the "
        "next, read that row's selected blocks in their long groups (before the first: all blocks)",
    )
    page_rank_bits: Literal[KEY_BITS] = Field(  # type: ignore[valid-type]
        0,
        description="page selection (qada) ranks KV blocks by the scores of a copy of the keys at "
        "this many bits (per channel on each page summary's min / max, as KIVI), kept beside the "
        "cache when the server launches with it; a change later may set only the launch value or "
        "0 (0: no copy, rank by the page statistics)",
    )
    random_fraction: float = Field(0.5, ge=0, le=1, description="long share of heads for random")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the random policy's draws")
    min_bulk: int = Field(
        0,
        ge=0,
        le=2**40,
        description="a decode row whose bulk is shorter reads everything (as stock) instead of "
        "deciding (deciding costs more than such a read on CPU)",
    )
    static_heads: str | list[tuple[int, int]] | None = Field(
        None,
        description="for static: the long heads, as [[layer, head], ...] or the name of a JSON file in "
        "attention.files_dir",
    )
    calib: str | None = Field(
        None, description="for calib: the name of a key statistics file (safetensors) in attention.files_dir"
    )
    observe: bool = Field(
        False,
        description="evaluation only: also compute the oracle's decisions and top-1 positions "
        "from all keys (full-attention cost)",
    )
    decode_tail: int = Field(
        0,
        ge=0,
        le=MAX_TOKENS,
        description="evaluation only: also run the last N prompt tokens through the decode path "
        "(prefill stays exact before them)",
    )

    @model_validator(mode="after")
    def _page_selection_needs_page_estimates(self) -> QadaSettings:
        if self.page_budget and self.page_top_k:
            raise ValueError("page_budget and page_top_k are two ways to select pages: set one")
        selects = bool(self.page_budget or self.page_top_k)
        if self.page_rank_dims and not (selects and self.policy == "qada"):
            raise ValueError(
                "page_rank_dims ranks the blocks of page selection: set page_budget or page_top_k"
            )
        if self.page_rank_bits and (self.page_rank_dims or self.page_rank_layers):
            raise ValueError(
                "page_rank_bits is a ranking of its own: not with page_rank_dims or page_rank_layers"
            )
        if self.page_rank_layers and not (selects and self.policy == "qada" and not self.page_rank_dims):
            raise ValueError(
                "page_rank_layers ranks the blocks of page selection (policy qada, without "
                "page_rank_dims): set page_budget or page_top_k"
            )
        ranks = (
            self.needs_pages
            or self.policy == "oracle"
            or (
                self.policy == "qada"
                and bool(self.page_rank_dims or self.page_rank_layers or self.page_rank_bits)
            )
        )
        if selects and not ranks:
            raise ValueError(
                "page selection ranks KV blocks by the page estimates (policy qada with stats pages "
                "or pages_bound), by partial key scores (qada with page_rank_dims), by a low-bit key copy "
                "(qada with page_rank_bits) or by their exact "
                f"masses (policy oracle), not {self.policy}/{self.stats}"
            )
        return self

    def replace(self, **changes) -> QadaSettings:
        """A validated copy with `changes` applied."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def logit_tau(self) -> float:
        """A head is long when log(bulk mass / local mass) exceeds this: logit(tau)."""
        return math.log(self.tau / (1.0 - self.tau))

    @property
    def window(self) -> tuple[int, int]:
        """(t_sink, t_local): what the bulk of a sequence is, and so what key moments cover."""
        return self.t_sink, self.t_local

    @property
    def decides(self) -> bool:
        """Whether decode rows are decided at all (`full` reads everything, as stock vLLM)."""
        return self.policy != "full"

    @property
    def estimates_bulk(self) -> bool:
        """qada: the bulk mass is estimated from key or score statistics."""
        return self.policy == "qada"

    @property
    def needs_moments(self) -> bool:
        """Per-request bulk-key moments (qada's `prompt` statistics)."""
        return self.estimates_bulk and self.stats == "prompt"

    @property
    def needs_pages(self) -> bool:
        """Page summaries of the keys (qada's `pages` and `pages_bound` statistics)."""
        return self.estimates_bulk and self.stats in ("pages", "pages_bound")

    @property
    def selects_pages(self) -> bool:
        """Long KV groups read only their selected bulk blocks (`page_select`)."""
        return self.policy in ("qada", "oracle") and bool(self.page_budget or self.page_top_k)

    @property
    def ranks_by_key_copy(self) -> bool:
        """Page selection ranks by the low-bit key copy (`page_rank_bits`)."""
        return self.selects_pages and self.policy == "qada" and bool(self.page_rank_bits)

    @property
    def needs_calib(self) -> bool:
        """Calibrated key statistics per layer (qada's `calib` statistics)."""
        return self.estimates_bulk and self.stats == "calib"

    @property
    def needs_local_score_stats(self) -> bool:
        """Mean and variance of the local scores (qada's `local` statistics)."""
        return self.estimates_bulk and self.stats == "local"

    @property
    def needs_exact_bulk(self) -> bool:
        """The exact bulk mass of every head (the oracle: reads the whole cache)."""
        return self.policy == "oracle"

    @property
    def needs_head_mask(self) -> bool:
        """A fixed set of long heads per layer (static)."""
        return self.policy == "static"

    @property
    def needs_generator(self) -> bool:
        """A seeded random draw per step (random)."""
        return self.policy == "random"

    @property
    def given_mask(self) -> bool:
        """Decisions that come as a mask (static, random) rather than from scores."""
        return self.needs_head_mask or self.needs_generator


def describe(exc: ValidationError) -> str:
    """One line naming each offending key, e.g. `engine.max_model_len: Input should be > 0`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<top>'}: {err['msg']}" for err in exc.errors()
    )


def settings_from_vllm_config(additional_config: dict | None) -> QadaSettings:
    """The launch settings, from vLLM's `--additional-config '{"qada": {...}}'`."""
    return QadaSettings.model_validate((additional_config or {}).get("qada") or {})


def files_dir_from_vllm_config(additional_config: dict | None) -> str | None:
    """The server's files directory (`attention.files_dir`), passed beside the settings."""
    return (additional_config or {}).get("qada_files_dir")


@dataclass(frozen=True)
class ActivePolicy:
    """The settings in force, with the files they name loaded for the worker's share of the
    model (its heads under tensor parallel): built whole and swapped whole."""

    settings: QadaSettings
    static_heads: Tensor | None = None  # bool [layers, Hq of the share]
    calib: tuple[Tensor, Tensor] | None = None  # mu [layers, Hkv, D], sigma [layers, Hkv, D, D]
    generator: torch.Generator | None = None
    # random: the draws are the whole model's (every layer's, in order), the share takes its own
    model_heads: int = 0
    model_layers: int = 0
    share: RankShare | None = None

    @classmethod
    def load(
        cls,
        settings: QadaSettings,
        shape: ModelShape,
        files: dict,
        device: torch.device | str = "cpu",
        share: RankShare | None = None,
    ) -> ActivePolicy:
        """Check `settings` against the model and build them with the contents of their files
        (`policy_files.read_policy_files`), for `share` (default: the whole model) onto the
        worker's `device`, once; raises PolicyError."""
        shape.check(settings)
        if settings.selects_pages and torch.device(device).type != "cpu":
            raise PolicyError("page selection (page_budget, page_top_k) runs on the CPU path only so far")
        if settings.page_rank_bits and torch.device(device).type != "cpu":
            raise PolicyError("page_rank_bits (the key copy) runs on the CPU path only so far")
        heads, kv_heads = (share.head_slice(), share.kv_head_slice()) if share else (slice(None),) * 2
        static_heads = calib = generator = None
        if settings.needs_head_mask:
            static_heads = static_heads_mask(files.get("static_heads"), shape)[:, heads].to(device)
        if settings.needs_calib:
            mu, sigma = calib_tensors(files.get("calib") or b"", shape)
            calib = (mu[:, kv_heads].to(device), sigma[:, kv_heads].to(device))
        if settings.needs_generator:  # drawn on the host: the same draws on every platform
            generator = torch.Generator().manual_seed(settings.seed)
        return cls(settings, static_heads, calib, generator, shape.num_heads, shape.num_layers, share)

    def layer_inputs(self, layer: int, batch: int, num_heads: int, device: torch.device) -> PolicyInputs:
        """This layer's policy inputs for a step of `batch` rows (the moments are the worker's
        per-request store's): calib (mu [Hkv, D], sigma [Hkv, D, D]), or the long mask (bool [Hq]
        for static; [B, Hq], drawn now, for random)."""
        if self.calib is not None:
            return PolicyInputs(calib=(self.calib[0][layer], self.calib[1][layer]))
        if self.static_heads is not None:
            return PolicyInputs(long_mask=self.static_heads[layer])
        if self.generator is not None:
            draws = self._random_draws(layer, batch, num_heads)
            return PolicyInputs(long_mask=draws.to(device, non_blocking=True))
        return PolicyInputs()

    def _random_draws(self, layer: int, batch: int, num_heads: int) -> Tensor:
        """This layer's draw of a step as a whole-model server draws it (every layer's heads in
        layer order), for the share: a pipeline stage also draws the other stages' layers."""
        if self.share is None:
            return random_long_mask(self.settings.random_fraction, batch, num_heads, self.generator)
        first, stop = self.share.layers
        skipped = first if layer == first else 0
        skipped_after = self.model_layers - stop if layer == stop - 1 else 0
        draws = [
            random_long_mask(self.settings.random_fraction, batch, self.model_heads, self.generator)
            for _ in range(skipped + 1 + skipped_after)
        ]
        return draws[skipped][:, self.share.head_slice()]
