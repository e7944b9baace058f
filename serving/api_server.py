"""vLLM's OpenAI server entry point (`vllm.entrypoints.launchers.api_server.entry.main`, same
arguments), run with uvicorn's h11 protocol and a limit vLLM has no flag for.

vLLM's own `--h11-max-incomplete-event-size` bounds the request line and headers, but only under
h11: uvicorn picks httptools when it is installed, which has no bound (30 MB of headers were
accepted). And uvicorn closes idle keep-alive connections but never one that opens and sends
nothing, or half a request (200 such connections were held 40 s and more): `HeadTimeoutH11`
closes a connection whose request line and headers are not complete in time. (No cap on
connections: uvicorn's `limit_concurrency` counts idle ones too, so 512 silent connections
would turn every request into a 503.)
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11(H11Protocol):
    """h11 with a deadline for each request's line and headers: from when the connection opens,
    and on a kept-alive connection from each response's end plus the keep-alive timeout."""

    head_timeout_s = float(os.environ.get("QADA_REQUEST_HEAD_TIMEOUT_S", "10"))
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle
        super().data_received(data)
        if self.cycle is not waiting:  # a request's head is in
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # idle, uvicorn closes it at keep-alive; a head begun
            self._arm_head_timer(self.timeout_keep_alive)  # then gets the head timeout on top

    def handle_websocket_upgrade(self, event) -> None:
        self._cancel_head_timer()  # the WebSocket protocol owns the connection from here
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _arm_head_timer(self, after_s: float = 0) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(after_s + self.head_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # no request in progress
            self.transport.close()


MULTI_API_SERVERS = (
    "--api-server-count {count}: qada serves with one API server process. A request's decisions are "
    "found through the response ids that the API server which served it recorded, and policy changes "
    "are serialised in one API server: with several, lookups would fail and changes race. Scale out "
    "with --tensor-parallel-size, or run one server per engine behind a load balancer"
)


DATA_PARALLEL = (
    "--data-parallel-size {engines}: vLLM returns the first engine's answers to a collective RPC "
    "only, so our routes would miss the other engines' decisions and not see a policy refused "
    "there; run one server per engine behind a load balancer"
)


def refusal(args) -> str | None:
    """Why these vLLM arguments cannot be served with our routes, or None."""
    from attention_backend.ranks import pipeline_parallel_refusal

    count = getattr(args, "api_server_count", None) or 1
    if count > 1:
        return MULTI_API_SERVERS.format(count=count)
    extra = getattr(args, "additional_config", None) or {}
    engines = getattr(args, "data_parallel_size", None) or 1
    if engines > 1 and "qada" in (json.loads(extra) if isinstance(extra, str) else extra):
        return DATA_PARALLEL.format(engines=engines)
    return pipeline_parallel_refusal(getattr(args, "pipeline_parallel_size", 1) or 1)


def main() -> None:
    import uvloop
    from vllm.entrypoints.launchers.api_server import entry
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # as vLLM's `entry.main`, with our uvicorn settings
    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM OpenAI-Compatible RESTful API server."))
    args = parser.parse_args()
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if why := refusal(args):  # before the engine starts, not a crash at the first request
        sys.exit(f"qada: {why}")
    uvloop.run(entry.run_server(args, http=HeadTimeoutH11))


if __name__ == "__main__":
    main()
