"""`serving.auth.ApiKeys`: every route but the public ones needs the API key, policy changes the
admin key, and a server with no key takes no policy change unless it allows them."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.auth import ApiKeys


def client(monkeypatch, api=None, admin=None, allow=False) -> TestClient:
    for name, value in (("QADA_API_KEY", api), ("QADA_ADMIN_API_KEY", admin)):
        monkeypatch.delenv(name, raising=False)
        if value:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("QADA_ALLOW_POLICY_CHANGES", "1" if allow else "0")
    ok = lambda request: PlainTextResponse("ok")
    paths = ["/health", "/metrics", "/invocations", "/tokenize", "/v1/completions", "/v1/qada/policy"]
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST", "PUT", "PATCH"]) for p in paths])
    return TestClient(ApiKeys(app))


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("path", ["/invocations", "/tokenize", "/v1/completions", "/v1/qada/policy"])
def test_every_route_needs_the_key(monkeypatch, path):
    http = client(monkeypatch, api="k")
    reply = http.post(path)
    assert reply.status_code == 401 and "key" in reply.json()["error"]["message"]
    assert http.post(path, headers=bearer("wrong")).status_code == 401
    assert http.post(path, headers=bearer("k")).status_code == 200
    assert http.get("/health").status_code == http.get("/metrics").status_code == 200


def test_policy_changes_need_the_admin_key(monkeypatch):
    http = client(monkeypatch, api="k", admin="adm")
    for method in ("PUT", "PATCH"):
        assert http.request(method, "/v1/qada/policy", headers=bearer("k")).status_code == 403
        assert http.request(method, "/v1/qada/policy").status_code == 401
        assert http.request(method, "/v1/qada/policy", headers=bearer("adm")).status_code == 200
    assert http.get("/v1/qada/policy", headers=bearer("k")).status_code == 200  # reading needs the API key
    assert http.post("/v1/completions", headers=bearer("adm")).status_code == 200  # admin may use the API


def test_without_keys_policy_changes_are_off_unless_allowed(monkeypatch):
    http = client(monkeypatch)
    assert http.post("/v1/completions").status_code == 200  # an open server stays open
    reply = http.put("/v1/qada/policy")
    assert reply.status_code == 403 and "allow_policy_changes" in reply.json()["error"]["message"]
    assert client(monkeypatch, allow=True).patch("/v1/qada/policy").status_code == 200
    # with an admin key only: the API stays open, policy changes need that key
    http = client(monkeypatch, admin="adm")
    assert http.post("/v1/completions").status_code == 200
    assert http.put("/v1/qada/policy").status_code == 401
    assert http.put("/v1/qada/policy/", headers=bearer("adm")).status_code in (200, 307)
