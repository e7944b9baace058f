"""Worker classes for QAdA: give the attention layers the batch's request ids, free per-request
state when requests finish or are preempted, and answer the server's RPCs (collective_rpc)."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from .state import WORKER_STATE


class QadaWorkerMixin:
    def execute_model(self, scheduler_output, *args, **kwargs):
        WORKER_STATE.runner = self.model_runner
        WORKER_STATE.forget(scheduler_output.finished_req_ids)
        WORKER_STATE.forget(getattr(scheduler_output, "preempted_req_ids", None))
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            WORKER_STATE.counters.end_step()

    def qada_counters(self) -> dict:
        """Decision counts so far."""
        return WORKER_STATE.counters.snapshot()

    def qada_configure(self, settings: dict) -> dict:
        """Replace the active policy; raises ValueError on bad settings."""
        return WORKER_STATE.configure(settings)

    def qada_settings(self) -> dict:
        return WORKER_STATE.settings

    def qada_request_stats(self, request_id: str) -> dict:
        """Decisions of one API request (its response id)."""
        return WORKER_STATE.counters.request(request_id)

    def qada_request_trace(self, request_id: str) -> dict | None:
        """Per-token (layer, head) decisions of one recent API request."""
        return WORKER_STATE.counters.trace(request_id)


class QadaCPUWorker(QadaWorkerMixin, CPUWorker):
    pass
