"""Worker classes for QAdA. The worker owns everything that outlives an engine step:
- the policy in force (`ActivePolicy`: applied here at start and on every change, swapped whole
  between steps),
- the per-request key moments (`MomentStore`), freed when requests finish or are preempted,
- the page summaries beside the KV cache (`PageSummaries`, at the launch `page_chunk`),
- the decision counts (`DecisionCounters`, mirrored into Prometheus) and the per-request log
  (`RequestLog`: `usage.qada` and the decision traces),
and gives each step its context (`context.StepContext`), which the attention builder and layers
read; it counts the step's decisions when the step ends. The server reaches it through
`collective_rpc` into the `qada_*` methods.
"""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from . import metrics
from .context import StepContext, reset_step_context, set_step_context
from .counters import DecisionCounters
from .moments import MomentStore
from .page_summaries import PageSummaries
from .request_log import RequestLog
from .settings import ActivePolicy, QadaSettings, settings_from_vllm_config


class QadaWorkerMixin:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._qada_policy: ActivePolicy | None = None  # loaded onto the device in init_device
        self._qada_moments = MomentStore()
        self._qada_pages: PageSummaries | None = None  # the launch page size is known in init_device
        self._qada_counters = DecisionCounters()
        self._qada_requests = RequestLog()

    def init_device(self) -> None:
        super().init_device()
        settings = settings_from_vllm_config(self.vllm_config.additional_config)
        self._qada_pages = PageSummaries(settings.page_chunk)
        self._apply(settings)

    def _apply(self, settings: QadaSettings) -> None:
        """Load what `settings` need and swap them in whole (between steps: RPCs and steps
        never run at the same time)."""
        self._qada_pages.check(settings.page_chunk, self.vllm_config.cache_config.block_size)
        policy = ActivePolicy.load(settings, self.device)
        metrics.policy_changed(self._qada_policy and self._qada_policy.settings, settings)
        self._qada_policy = policy

    def execute_model(self, scheduler_output, *args, **kwargs):
        self._qada_moments.forget(scheduler_output.finished_req_ids)
        self._qada_moments.forget(getattr(scheduler_output, "preempted_req_ids", None))
        context = StepContext(self._qada_policy, self._qada_moments, self.model_runner, self._qada_pages)
        set_step_context(context)
        try:
            return super().execute_model(scheduler_output, *args, **kwargs)
        finally:
            reset_step_context()
            step = context.step_decisions()
            if step is not None:
                self._qada_counters.add(step)
                self._qada_requests.add(step)

    def qada_configure(self, settings: dict) -> dict:
        """Replace the policy in force (validated, files loaded) from the next step on; raises
        ValueError on bad settings and then changes nothing."""
        self._apply(QadaSettings.model_validate(settings))
        return self.qada_settings()

    def qada_settings(self) -> dict:
        return self._qada_policy.settings.model_dump()

    def qada_counters(self) -> dict:
        """Decision counts so far."""
        return self._qada_counters.snapshot()

    def qada_request_stats(self, request_id: str) -> dict:
        """Decisions of one API request (its response id)."""
        return self._qada_requests.request(request_id)

    def qada_request_trace(self, request_id: str) -> dict | None:
        """Per-token (layer, head) decisions of one recent API request."""
        return self._qada_requests.trace(request_id)


class QadaCPUWorker(QadaWorkerMixin, CPUWorker):
    pass
