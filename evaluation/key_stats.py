"""`calib` statistics for qada: mean and covariance of the cached (post-RoPE) keys per (layer, KV
head) over calibration text, from the model run with transformers. Written as safetensors with
the model's shape and a checksum of its weights manifest in the metadata (format version 1)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch


@torch.no_grad()
def key_statistics(model_dir: Path, token_ids: list[int], t_sink: int, out: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cache = model(torch.tensor([token_ids]), use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])[:, :, t_sink:]  # [L, Hkv, T, D]
    mu = keys.mean(2)
    centred = keys - mu.unsqueeze(2)
    sigma = torch.einsum("lhtd,lhte->lhde", centred, centred) / keys.shape[2]
    manifest = model_dir / "qada-manifest.json"  # written by `qada prepare-model`
    metadata = {
        "format": "qada-calib/1",
        "model": model_dir.name,
        "num_layers": str(keys.shape[0]),
        "num_kv_heads": str(keys.shape[1]),
        "head_dim": str(keys.shape[3]),
        "tokens": str(keys.shape[2]),
        "t_sink": str(t_sink),
        "model_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()
        if manifest.exists()
        else "",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, str(out), metadata=metadata)
    return out
