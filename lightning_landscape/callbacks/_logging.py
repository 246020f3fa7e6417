"""Where measurements go: scalars through every logger, images and notes through each logger's adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_utilities.core.rank_zero import rank_zero_warn

from lightning_landscape._lightning import Trainer
from lightning_landscape.loggers import LoggerAdapter, adapter_for
from lightning_landscape.plotting import SurfaceMesh, figure_to_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class MeasurementLogger:
    """Writes one callback's scalars, images and notes to every logger of the trainer (rank zero only).

    Scalars go through ``log_metrics`` of every logger; images and text notes through the logger's adapter
    (:mod:`lightning_landscape.loggers`: TensorBoard, W&B, MLflow, Comet, any logger with ``log_image``, PNG files
    for the rest). With no logger at all, one warning and nothing is written.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._warned: set[str] = set()
        self._adapters: dict[int, LoggerAdapter] = {}

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{self.owner}: {message}")

    def _adapter(self, logger: object) -> LoggerAdapter:
        adapter = self._adapters.get(id(logger))
        if adapter is None or adapter.logger is not logger:
            adapter = self._adapters[id(logger)] = adapter_for(logger)
            if adapter.kind == "files":
                self.warn_once(
                    f"png-{type(logger).__name__}",
                    f"{type(logger).__name__} cannot show images; they are saved as PNG files under "
                    f"{adapter.directory}/images (notes in notes.txt).",
                )
            if adapter.kind == "none":
                self.warn_once(
                    f"no-images-{type(logger).__name__}",
                    f"{type(logger).__name__} has neither an image API nor a directory; it gets scalars only.",
                )
        return adapter

    def log(
        self,
        trainer: Trainer,
        scalars: dict[str, float],
        figures: dict[str, Figure | SurfaceMesh] | None = None,
        step: int | None = None,
    ) -> None:
        figures = figures or {}
        step = trainer.global_step if step is None else step
        if not trainer.is_global_zero:
            return
        if not trainer.loggers:
            self.warn_once("no-logger", "the trainer has no logger; measurements are kept only in `last_metrics`.")
            return
        # a SurfaceMesh goes to TensorBoard's mesh plugin (other loggers have no mesh view and skip it)
        meshes = {tag: fig for tag, fig in figures.items() if isinstance(fig, SurfaceMesh)}
        images = {tag: figure_to_array(fig) for tag, fig in figures.items() if tag not in meshes}
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=step)
            adapter = self._adapter(logger)
            for tag, image in images.items():
                adapter.image(tag, image, step)
            for tag, mesh in meshes.items():
                adapter.mesh(tag, *mesh, step=step)

    def note(self, trainer: Trainer, tag: str, text: str) -> None:
        """A text note (e.g. which HVP method ran and why) to every logger."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            self._adapter(logger).text(tag, text, trainer.global_step)
