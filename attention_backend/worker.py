"""Worker classes for QAdA. The worker owns everything that outlives an engine step:
- the policy in force (`ActivePolicy`: applied here at start and on every change, swapped whole
  between steps),
- the per-request key moments (`MomentStore`), freed when requests finish or are preempted,
- the page summaries beside the KV cache (`PageSummaries`, at the launch `page_chunk`, with the
  launch `page_rank_bits` key copy),
- the decision counts (`DecisionCounters`, mirrored into Prometheus) and the per-request log
  (`RequestLog`: `usage.qada` and the decision traces),
and gives each step its context (`context.StepContext`), which the attention builder and layers
read; it counts the step's decisions when the step ends. The server reaches every worker through
`collective_rpc` into the `qada_*` methods. Under tensor or pipeline parallel each worker does all
of this for its own share of the model (`ranks.RankShare`: its heads, its layers), and answers
with its share, for the server to merge (`ranks.merge_*`).
"""

from __future__ import annotations

from pydantic import ValidationError
from vllm.v1.worker.cpu_worker import CPUWorker

from . import metrics, summary_scores
from .context import StepContext, reset_step_context, set_step_context
from .counters import DecisionCounters
from .moments import MomentStore
from .page_summaries import PageSummaries
from .policy_files import ModelShape, one_line, read_policy_files
from .ranks import RANK, RankShare, pipeline_parallel_refusal
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
        self._qada_pending: tuple[str, ActivePolicy] | None = None  # prepared, not yet in force

    def init_device(self) -> None:
        super().init_device()
        refusal = pipeline_parallel_refusal(self.vllm_config.parallel_config.pipeline_parallel_size)
        if refusal:  # launches through `serving.api_server` are refused before the engine starts
            raise RuntimeError(refusal)
        settings = settings_from_vllm_config(self.vllm_config.additional_config)
        self._qada_shape = ModelShape.from_vllm_config(
            self.vllm_config, settings.page_chunk, settings.page_rank_bits
        )
        self._qada_share = RankShare.current(self._qada_shape)
        self._qada_pages = PageSummaries(settings.page_chunk, settings.page_rank_bits)
        if self.device.type == "cpu":  # built (or found) now: a missing compiler warns at launch
            summary_scores.library()
        files_dir = files_dir_from_vllm_config(self.vllm_config.additional_config)
        self._apply(settings, read_policy_files(settings, files_dir))

    def _apply(self, settings: QadaSettings, files: dict) -> None:
        """Build `settings` with their files' contents and swap them in whole (between steps:
        RPCs and steps never run at the same time); raises PolicyError and then changes nothing."""
        self._swap_in(self._load(settings, files))

    def _load(self, settings: QadaSettings, files: dict) -> ActivePolicy:
        return ActivePolicy.load(settings, self._qada_shape, files, self.device, self._qada_share)

    def _swap_in(self, policy: ActivePolicy) -> None:
        metrics.policy_changed(self._qada_policy and self._qada_policy.settings, policy.settings)
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

    def qada_prepare(self, settings: dict, files: dict, token: str) -> dict:
        """Build a policy to put in force at `qada_commit(token)`, with the contents of its files
        as the API server read them (`read_policy_files`: the worker opens no client path). A
        policy change is two collective RPCs: this one on every rank, then, only if no rank
        refused, the commit, which every rank receives between the same two engine steps (vLLM
        sends RPCs and steps to all workers in one ordered queue). A bad policy comes back as
        {"error": message}, not as an exception (which the engine would log with its
        traceback), and nothing changes."""
        self._qada_pending = None
        try:
            policy = self._load(QadaSettings.model_validate(settings), files)
        except ValidationError as exc:
            return self._answer({"error": describe(exc)})
        except Exception as exc:  # PolicyError, or the device (out of memory): an answer, never a
            return self._answer({"error": one_line(exc)})  # raise, which would leave the other
        self._qada_pending = (token, policy)  # ranks' answers unread in vLLM's response queues
        return self._answer({})

    def qada_commit(self, token: str) -> dict:
        """Put the policy prepared under `token` in force from the next step on."""
        pending, self._qada_pending = self._qada_pending, None
        if pending is None or pending[0] != token:
            return self._answer({"error": "no policy was prepared under this token"})
        self._swap_in(pending[1])
        return self.qada_settings()

    def qada_settings(self) -> dict:
        return self._answer(self._qada_policy.settings.model_dump())

    def qada_counters(self) -> dict:
        """Decision counts so far."""
        return self._answer(self._qada_counters.snapshot())

    def qada_request_stats(self, key: str) -> dict:
        """Decisions of one API request (its tag: `request_log.REQUEST_TAG`)."""
        return self._answer(self._qada_requests.request(key))

    def qada_request_trace(self, key: str) -> dict | None:
        """Per-token (layer, head) decisions of one recent API request (its tag)."""
        trace = self._qada_requests.trace(key)
        return None if trace is None else self._answer(trace)

    def _answer(self, answer: dict) -> dict:
        """An answer to the API server, with this rank's share of the model for the merge."""
        return {**answer, RANK: self._qada_share.as_dict()}


class QadaCPUWorker(QadaWorkerMixin, CPUWorker):
    pass
