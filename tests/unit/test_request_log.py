"""Per-request decisions are keyed exactly: by the tag of the API request (all its engine
requests together), never by id prefix, so client-chosen ids cannot merge or read two requests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from attention_backend.context import StepDecisions
from attention_backend.request_log import REQUEST_TAG, RequestLog, request_keys


def runner_with(tags: dict[str, str | None]):
    """A model runner whose request states carry these tags in their sampling parameters."""
    return SimpleNamespace(
        requests={
            req_id: SimpleNamespace(
                sampling_params=SimpleNamespace(extra_args={REQUEST_TAG: tag} if tag else None)
            )
            for req_id, tag in tags.items()
        }
    )


def step(req_ids: list[str], long: list[int]) -> StepDecisions:
    heads = torch.tensor([[[bool(x)] * 2] for x in long])  # [rows, 1 layer, 2 heads]
    return StepDecisions(
        req_ids,
        [0],
        torch.tensor([500] * len(req_ids)),
        heads,
        heads[..., :1],
        token_bytes=4,
        local_tokens=144,
    )


def test_keys_are_tags_else_engine_ids():
    runner = runner_with({"cmpl-abc-0-1a2b3c4d": "t1", "x": None})
    assert request_keys(runner, ["cmpl-abc-0-1a2b3c4d", "x", "unknown"]) == ["t1", "x", "unknown"]
    assert request_keys(SimpleNamespace(), ["r"]) == ["r"]  # a runner without request states


def test_client_ids_that_share_a_prefix_or_repeat_never_merge():
    log = RequestLog()
    # clients chose "abc", "abc-def" and "abc" again: three API requests, three tags
    ids = ["cmpl-abc-0-11111111", "cmpl-abc-def-0-22222222", "cmpl-abc-0-33333333"]
    log.add(step(ids, [1, 0, 0]), ["t1", "t2", "t3"])
    log.add(step(ids[:1], [1]), ["t1"])
    assert log.request("t1")["decode_steps"] == 2 and log.request("t1")["head_decisions"]["long"] == 4
    assert log.request("t2")["decode_steps"] == 1 and log.request("t2")["head_decisions"]["long"] == 0
    assert log.request("t3")["decode_steps"] == 1
    assert log.request("cmpl-abc")["decode_steps"] == 0  # no prefix lookups
    assert log.trace("cmpl-abc") is None and log.trace("t2")["request_id"] == ids[1]


def test_the_engine_requests_of_one_api_request_add_up():
    log = RequestLog(max_traces=1)
    log.add(step(["0_cmpl-q-0-aaaaaaaa", "1_cmpl-q-0-aaaaaaaa"], [1, 0]), ["t", "t"])  # n = 2
    assert log.request("t")["decode_steps"] == 2 and log.request("t")["head_decisions"] == {
        "long": 2,
        "local": 2,
    }
    log.add(step(["other"], [0]), ["u"])  # the oldest trace goes, and its key with it
    assert log.trace("t") is None and set(log.trace_keys) == {"other"}


def test_tokens_decoded_again_after_preemption_count_once(monkeypatch):
    log = RequestLog()
    log.add(step(["r"], [1]), ["t"])
    replay = step(["r", "r", "r"], [1, 1, 0])
    replay.replayed = (True, True, False)  # a resumed request: two tokens again, one new
    log.add(replay, ["t"] * 3)
    assert log.request("t")["decode_steps"] == 2 and len(log.trace("t")["long"]) == 2


def test_only_tags_that_begin_with_the_launch_secret_are_trusted(monkeypatch):
    import attention_backend.request_log as request_log

    monkeypatch.setattr(request_log, "_TAG_SECRET", "s3cret")
    tag = request_log.new_tag()
    runner = runner_with({"a": tag, "b": "made-up-by-a-client", "c": "s3cret"})
    assert tag.startswith("s3cret") and request_keys(runner, ["a", "b", "c"]) == [tag, "b", "c"]
