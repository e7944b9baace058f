"""What a policy may be for the model being served, and the files it names.

Files (`static_heads`, `calib`) are read only from the server's files directory
(`attention.files_dir`): by plain name, as regular files (no FIFO, device or symlink) under a size
limit, and checked against the model's shape before anything is applied. The API server reads
them when it validates a policy change and sends the worker their contents, so the worker never
opens a path a client named; the launch policy's files are read the same way by the worker.
Every error is a `PolicyError` with a one-line message that says nothing about other paths.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .page_summaries import check_page_chunk

if TYPE_CHECKING:
    from .settings import QadaSettings

MAX_FILE_BYTES = 256 * 2**20


class PolicyError(ValueError):
    """A policy that cannot apply to this model or server; its message is one line for the client."""


def one_line(exc: BaseException) -> str:
    """An exception's message as one line for a client (its type when it has none)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class ModelShape:
    """The served model's dimensions and limits that bound a policy."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    max_model_len: int
    block_size: int
    page_chunk: int  # the launch page size: what the page summaries store
    page_rank_bits: int = 0  # the launch key copy's bits (0: none kept)

    @classmethod
    def from_vllm_config(cls, vllm_config, page_chunk: int, page_rank_bits: int = 0) -> ModelShape:
        model = vllm_config.model_config
        text = model.hf_text_config
        return cls(
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_size=model.get_head_size(),
            max_model_len=model.max_model_len,
            block_size=vllm_config.cache_config.block_size,
            page_chunk=page_chunk,
            page_rank_bits=page_rank_bits,
        )

    def check(self, settings: QadaSettings) -> None:
        """Bounds that come from the model and the launch (the settings model has the absolute
        ones)."""
        if settings.t_sink + settings.t_local >= self.max_model_len:
            raise PolicyError(
                f"t_sink + t_local must be below max_model_len ({self.max_model_len}), "
                f"got {settings.t_sink} + {settings.t_local}"
            )
        if any(layer >= self.num_layers for layer in settings.page_rank_layers):
            raise PolicyError(f"page_rank_layers must name layers below {self.num_layers}")
        if settings.decode_tail > self.max_model_len:
            raise PolicyError(f"decode_tail must be at most max_model_len ({self.max_model_len})")
        if settings.page_rank_bits not in (0, self.page_rank_bits):
            raise PolicyError(
                f"page_rank_bits {settings.page_rank_bits} needs a key copy at that many bits: this "
                f"server keeps {f'a {self.page_rank_bits}-bit one' if self.page_rank_bits else 'none'} "
                "(set page_rank_bits at launch)"
            )
        try:
            check_page_chunk(settings.page_chunk, self.page_chunk, self.block_size)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None


def read_file(files_dir: str | None, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file `name` in `files_dir`."""
    if files_dir is None:
        raise PolicyError("policy files are off on this server (no attention.files_dir)")
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise PolicyError(
            f"{name!r} is not a file name: name a file in attention.files_dir, without directories"
        )
    missing = PolicyError(f"no regular file named {name!r} in attention.files_dir")
    try:  # O_NONBLOCK: opening a FIFO returns at once; O_NOFOLLOW: a symlink is refused
        fd = os.open(Path(files_dir) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENXIO):
            raise missing from None
        raise PolicyError(f"cannot read {name!r} in attention.files_dir") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise missing
        if info.st_size > max_bytes:
            raise PolicyError(f"{name!r} is larger than {max_bytes} bytes")
        chunks, size = [], 0
        while chunk := os.read(fd, min(2**20, max_bytes + 1 - size)):  # to the end, in MiB reads
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:  # it grew since fstat
                raise PolicyError(f"{name!r} is larger than {max_bytes} bytes")
        return b"".join(chunks)
    except OSError:
        raise PolicyError(f"cannot read {name!r} in attention.files_dir") from None
    finally:
        os.close(fd)


def read_policy_files(settings: QadaSettings, files_dir: str | None) -> dict:
    """The contents of the files `settings` name, as the worker takes them: `static_heads` as
    [[layer, head], ...] (inline or from its JSON file), `calib` as the safetensors bytes."""
    files: dict = {"static_heads": None, "calib": None}
    if settings.needs_head_mask:
        heads = settings.static_heads
        if heads is None:
            raise PolicyError("policy 'static' needs static_heads: [[layer, head], ...] or a JSON file name")
        if isinstance(heads, str):
            data = read_file(files_dir, heads)
            try:
                heads = json.loads(data)["long_heads"]
            except (ValueError, KeyError, TypeError, RecursionError):
                raise PolicyError(
                    f"{settings.static_heads!r} is not a JSON object with long_heads: [[layer, head], ...]"
                ) from None
        files["static_heads"] = heads
    if settings.needs_calib:
        if settings.calib is None:
            raise PolicyError("stats 'calib' needs calib: the name of a safetensors file with mu and sigma")
        files["calib"] = read_file(files_dir, settings.calib)
    return files


def static_heads_mask(heads, shape: ModelShape) -> Tensor:
    """[[layer, head], ...] -> bool [layers, Hq], every pair checked against the model."""
    mask = torch.zeros(shape.num_layers, shape.num_heads, dtype=torch.bool)
    if not isinstance(heads, list | tuple):
        raise PolicyError("static_heads must be a list of [layer, head] pairs")
    for pair in heads:
        if (
            not isinstance(pair, list | tuple)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
            or not (0 <= pair[0] < shape.num_layers and 0 <= pair[1] < shape.num_heads)
        ):
            raise PolicyError(
                f"static_heads: {str(pair)[:40]} is not a [layer, head] of this model "
                f"({shape.num_layers} layers, {shape.num_heads} query heads)"
            )
        mask[pair[0], pair[1]] = True
    return mask


def calib_tensors(data: bytes, shape: ModelShape) -> tuple[Tensor, Tensor]:
    """safetensors bytes with mu [layers, Hkv, D] and sigma [layers, Hkv, D, D], finite."""
    from safetensors.torch import load

    want = {
        "mu": (shape.num_layers, shape.num_kv_heads, shape.head_size),
        "sigma": (shape.num_layers, shape.num_kv_heads, shape.head_size, shape.head_size),
    }
    try:
        tensors = load(data)
    except Exception:  # safetensors raises its own error types for any malformed header
        raise PolicyError("calib is not a safetensors file") from None
    out = []
    for key, dims in want.items():
        tensor = tensors.get(key)
        if tensor is None or tuple(tensor.shape) != dims or not tensor.is_floating_point():
            raise PolicyError(f"calib needs a float tensor {key} of shape {list(dims)} for this model")
        if not torch.isfinite(tensor.float()).all():
            raise PolicyError(f"calib: {key} has non-finite values")
        out.append(tensor.float())
    return out[0], out[1]
