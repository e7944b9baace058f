"""The few calls the harness makes to a running server (plain HTTP, OpenAI error shape)."""

from __future__ import annotations

import httpx


class EvalError(RuntimeError):
    pass


class ServerClient:
    def __init__(
        self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 1800
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.model = model or self._get("/v1/models")["data"][0]["id"]
        self.qada = self._get("/v1/qada/policy").get("enabled", False)

    def _check(self, response: httpx.Response) -> dict:
        if response.status_code != 200:
            raise EvalError(
                f"{response.request.method} {response.request.url.path}: "
                f"{response.status_code} {response.text[:500]}"
            )
        return response.json()

    def _get(self, path: str) -> dict:
        return self._check(self.http.get(path))

    def policy(self) -> dict:
        return {k: v for k, v in self._get("/v1/qada/policy").items() if k != "enabled"}

    def set_policy(self, settings: dict) -> dict:
        if not self.qada:
            raise EvalError("this server serves stock attention; start it with a QAdA policy")
        return self._check(self.http.put("/v1/qada/policy", json=settings))

    def complete(self, prompt_ids: list[int], max_tokens: int, cache_salt: str | None = None) -> dict:
        """Greedy completion of a token-id prompt: text, generated token ids, response id, and
        usage.qada (on a QAdA server)."""
        body = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        if cache_salt:
            body["cache_salt"] = cache_salt
        out = self._check(
            self.http.post("/v1/completions", json=body, headers={"X-QAdA-Stats": "1"} if self.qada else {})
        )
        choice = out["choices"][0]
        return {
            "id": out["id"],
            "text": choice["text"],
            "token_ids": [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]],
            "qada": out["usage"].get("qada"),
        }

    def trace(self, response_id: str) -> dict:
        return self._get(f"/v1/qada/requests/{response_id}/decisions")
