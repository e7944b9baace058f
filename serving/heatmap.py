"""`qada heatmap`: a picture of one request's decode-time decisions, (layer, query head) x token."""

from __future__ import annotations

from pathlib import Path

import httpx


def fetch_decisions(url: str, request_id: str, api_key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(f"{url}/v1/qada/requests/{request_id}/decisions", headers=headers, timeout=60)
    if reply.status_code != 200:
        raise RuntimeError(reply.json()["error"]["message"])
    return reply.json()


def run_prompt(
    url: str, api_key: str | None, model: str | None, prompt: str, max_tokens: int
) -> tuple[str, list[str]]:
    """Greedy completion; returns its id and generated tokens."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "EMPTY", timeout=3600)
    model = model or client.models.list().data[0].id
    reply = client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0
    )
    return reply.id, reply.choices[0].logprobs.tokens


def plot(decisions: dict, out: Path, tokens: list[str] | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    long = np.array(decisions["long"], dtype=float)  # [steps, layers, heads]
    if long.size == 0:
        raise RuntimeError("the request has no decode steps to show")
    steps, layers, heads = long.shape
    image = long.reshape(steps, layers * heads).T  # rows: layer-major (layer, head)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * steps + 2), 9))
    ax.imshow(image, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1.25)
    ax.set_yticks(
        [layer * heads + heads / 2 - 0.5 for layer in range(0, layers, 2)],
        [f"layer {layer}" for layer in range(0, layers, 2)],
        fontsize=7,
    )
    for layer in range(1, layers):
        ax.axhline(layer * heads - 0.5, color="#ddd", linewidth=0.4)
    # The first generated token comes from the (exact) prefill: decode step i makes token i + 1.
    labels = tokens[1 : steps + 1] if tokens else [str(i + 1) for i in range(steps)]
    ax.set_xticks(range(steps), [repr(t)[1:-1] for t in labels], rotation=90, fontsize=7)
    ax.set_xlabel("generated token (decode steps)")
    share = long.mean()
    ax.set_title(title or f"long-context (black) vs local query heads: {share:.1%} long", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
