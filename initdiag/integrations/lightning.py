"""PyTorch Lightning: :class:`InitdiagCallback`, a TorchMonitor for ``Trainer.fit``.

Needs ``lightning`` (or the older ``pytorch_lightning``), tested with
``lightning==2.6.0`` on ``torch==2.13.0``.  The statistics go to the trainer's
loggers (``log_metrics``, keys ``initdiag/<layer>/<statistic>``, step = the
trainer's ``global_step``) and to ``sink`` when given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - the older package name
    try:
        from pytorch_lightning import Callback
    except ImportError as exc:
        raise ImportError(
            "initdiag.integrations.lightning needs PyTorch Lightning: pip install "
            f"lightning (with torch==2.13.0 kept); importing it failed: {exc}"
        ) from exc

from ._torch_monitor import TorchMonitor

__all__ = ["InitdiagCallback"]


class _LoggerSink:
    """Monitor sink writing through a trainer's loggers."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def write(self, step: int, layer: str, values: dict[str, float]) -> None:
        self._log({f"initdiag/{layer}/{k}": float(v) for k, v in values.items()}, step)

    def write_reference(
        self, step: int, layer: str, source: str, values: dict[str, float]
    ) -> None:
        self._log(
            {f"initdiag/{layer}/{k}/{source}": float(v) for k, v in values.items()},
            step,
        )

    def _log(self, metrics: dict[str, float], step: int) -> None:
        for lg in getattr(self.trainer, "loggers", None) or []:
            lg.log_metrics(metrics, step=step)


class InitdiagCallback(Callback):
    """Monitor every leaf module of the LightningModule during ``fit``.

    Parameters
    ----------
    every : int
        Record optimizer steps ``global_step % every == 0``.
    modules, bins, history, backend, predict, predict_options
        As :class:`~initdiag.integrations._torch_monitor.TorchMonitor`
        (``predict``: an example batch for the LightningModule's ``forward``;
        the prediction is logged as ``initdiag/<layer>/<statistic>/<source>`` at
        the first step).
    sink : optional
        An extra sink (path, SummaryWriter, ...), besides the trainer's loggers.

    Attributes
    ----------
    monitor : initdiag.Monitor or None
        The statistics of the last fit (``rows()``, ``findings``, ``summary()``).
    """

    def __init__(
        self,
        every: int = 10,
        modules: Iterable[Any] | None = None,
        sink: Any = None,
        *,
        bins: int | None = None,
        history: int = 10_000,
        backend: str | None = None,
        predict: Any = None,
        predict_options: Any = None,
    ) -> None:
        super().__init__()
        self.every, self.modules, self.sink = every, modules, sink
        self.bins, self.history, self.backend = bins, history, backend
        self.predict, self.predict_options = predict, predict_options
        self.monitor = None
        self._tm: TorchMonitor | None = None
        self._last: int | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        sinks = [_LoggerSink(trainer)] + ([self.sink] if self.sink is not None else [])
        self._tm = TorchMonitor(
            pl_module,
            every=self.every,
            modules=self.modules,
            sink=sinks,
            bins=self.bins,
            history=self.history,
            backend=self.backend,
            predict=self.predict,
            predict_options=self.predict_options,
        ).__enter__()
        self.monitor = self._tm.monitor
        self._last = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch, idx) -> None:
        # with gradient accumulation several batches share one optimizer step
        if self._tm is not None and trainer.global_step != self._last:
            self._last = trainer.global_step
            self._tm.step(trainer.global_step)

    def _close(self, exc: BaseException | None = None) -> None:
        if self._tm is not None:
            tm, self._tm = self._tm, None
            if exc is None:
                tm.__exit__(None, None, None)
            else:
                tm.__exit__(type(exc), exc, exc.__traceback__)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException):
        self._close(exception)
