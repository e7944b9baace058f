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

from pydantic import ValidationError
from vllm.v1.worker.cpu_worker import CPUWorker

from . import metrics
from .context import StepContext, reset_step_context, set_step_context
from .counters import DecisionCounters
from .moments import MomentStore
from .page_summaries import PageSummaries
from .policy_files import ModelShape, one_line, read_policy_files
from .request_log import RequestLog, request_keys
from .settings import (
    ActivePolicy,
    QadaSettings,
    describe,
    files_dir_from_vllm_config,
    settings_from_vllm_config,
)


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
        self._qada_shape = ModelShape.from_vllm_config(self.vllm_config, settings.page_chunk)
        self._qada_pages = PageSummaries(settings.page_chunk)
        files_dir = files_dir_from_vllm_config(self.vllm_config.additional_config)
        self._apply(settings, read_policy_files(settings, files_dir))

    def _apply(self, settings: QadaSettings, files: dict) -> None:
        """Build `settings` with their files' contents and swap them in whole (between steps:
        RPCs and steps never run at the same time); raises PolicyError and then changes nothing."""
        policy = ActivePolicy.load(settings, self._qada_shape, files, self.device)
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
                self._qada_requests.add(step, request_keys(self.model_runner, step.req_ids))

    def qada_configure(self, settings: dict, files: dict) -> dict:
        """Replace the policy in force from the next step on, with the contents of its files as
        the API server read them (`read_policy_files`: the worker opens no client path). A bad
        policy changes nothing and comes back as {"error": message}, not as an exception (which
        the engine would log with its traceback)."""
        try:
            self._apply(QadaSettings.model_validate(settings), files)
        except ValidationError as exc:
            return {"error": describe(exc)}
        except ValueError as exc:  # PolicyError
            return {"error": one_line(exc)}
        return self.qada_settings()

    def qada_settings(self) -> dict:
        return self._qada_policy.settings.model_dump()

    def qada_counters(self) -> dict:
        """Decision counts so far."""
        return self._qada_counters.snapshot()

    def qada_request_stats(self, key: str) -> dict:
        """Decisions of one API request (its tag: `request_log.REQUEST_TAG`)."""
        return self._qada_requests.request(key)

    def qada_request_trace(self, key: str) -> dict | None:
        """Per-token (layer, head) decisions of one recent API request (its tag)."""
        return self._qada_requests.trace(key)


class QadaCPUWorker(QadaWorkerMixin, CPUWorker):
    pass
