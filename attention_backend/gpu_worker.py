"""The GPU worker class for QAdA (UNTESTED ON HARDWARE: no GPU vLLM on the development machines).
Same bookkeeping as the CPU worker; selected by `qada serve` on GPU platforms."""

from __future__ import annotations

from vllm.v1.worker.gpu_worker import Worker

from .worker import QadaWorkerMixin


class QadaGPUWorker(QadaWorkerMixin, Worker):
    pass
