"""`qada serve` and Debian's `prometheus` as processes on loopback, for the tests and the
benchmarks that drive a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
API_KEY = "sk-qada-test"
SERVED_NAME = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def greedy_at_once(
    url: str, prompts: list[str], max_tokens: int, *, ignore_eos: bool = True, headers: dict | None = None
) -> list:
    """All prompts at once (the engine batches them), each a temperature-0 completion of up to
    `max_tokens` (all of them with `ignore_eos`): the replies, in order."""
    import asyncio

    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=3600)
    extra = {"ignore_eos": True} if ignore_eos else None
    return await asyncio.gather(
        *(
            client.completions.create(
                model=SERVED_NAME,
                prompt=p,
                max_tokens=max_tokens,
                temperature=0,
                extra_body=extra,
                extra_headers=headers,
            )
            for p in prompts
        )
    )


class Server:
    """`qada serve ARGS` on a free loopback port, with API_KEY, logging to `log`."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
            *args,  # last: they may end with `-- VLLM_ARGS`
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=open(log, "w"),  # noqa: SIM115 (the server process owns it)
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Prometheus:
    """Debian's `prometheus` on loopback, scraping `target` (host:port) every second."""

    def __init__(self, binary: str, target: str, work: Path):
        import yaml

        (work / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s"},
                    "scrape_configs": [{"job_name": "qada", "static_configs": [{"targets": [target]}]}],
                }
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=open(work / "log", "w"),  # noqa: SIM115 (prometheus owns it)
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("prometheus did not become ready: " + (work / "log").read_text()[-2000:])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
