"""Where measurements go: scalars through every logger, images to TensorBoard or PNG files."""

from __future__ import annotations

import os

import numpy as np
import pytorch_lightning as pl
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_warn

from lightning_landscape.plotting import figure_to_array


class MeasurementLogger:
    """Writes one callback's scalars, images and notes to the trainer's loggers (rank zero only).

    Scalars go through ``log_metrics`` of every logger. Images go to a TensorBoard logger's
    ``experiment.add_image``; with another logger they become PNG files under its directory,
    with one warning. With no logger at all, one warning and nothing is written.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._warned: set[str] = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"{self.owner}: {message}")

    def log(
        self,
        trainer: pl.Trainer,
        scalars: dict[str, float],
        figures: dict[str, Figure] | None = None,
        step: int | None = None,
    ) -> None:
        figures = figures or {}
        step = trainer.global_step if step is None else step
        if not trainer.is_global_zero:
            return
        if not trainer.loggers:
            self.warn_once("no-logger", "the trainer has no logger; measurements are kept only in `last_metrics`.")
            return
        for logger in trainer.loggers:
            if scalars:
                logger.log_metrics(scalars, step=step)
            for tag, fig in figures.items():
                self._log_image(logger, tag, figure_to_array(fig), step)

    def _log_image(self, logger: object, tag: str, image: np.ndarray, step: int) -> None:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
            return
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory is None:
            self.warn_once(
                f"no-dir-{type(logger).__name__}", f"{type(logger).__name__} has no directory; images are not saved."
            )
            return
        self.warn_once(
            f"png-{type(logger).__name__}",
            f"{type(logger).__name__} cannot show images; they are saved as PNG files under {directory}/images.",
        )
        from matplotlib.image import imsave

        path = os.path.join(directory, "images", f"{tag.replace('/', '_')}_step{step:08d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        imsave(path, image)

    def note(self, trainer: pl.Trainer, tag: str, text: str) -> None:
        """A text note (e.g. which HVP method ran) to TensorBoard's text tab, if there is one."""
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, text, global_step=trainer.global_step)
