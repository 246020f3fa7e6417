"""Telling the progress bar that a measurement runs (it would otherwise sit frozen for the measurement's seconds)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from lightning_landscape._lightning import Trainer

__all__ = ["progress_note"]


@contextlib.contextmanager
def progress_note(trainer: Trainer, text: str) -> Iterator[None]:
    """Show ``text`` in the trainer's progress bar while the block runs (TQDM: the postfix; Rich: the description),
    then put back what was there. A trainer without a progress bar, or another kind of bar, is left alone.

    Example:
        >>> class Bar:                      # stands for the TQDM bar of Lightning's TQDMProgressBar
        ...     postfix = "loss=0.1"
        ...     def set_postfix_str(self, s, refresh=True):
        ...         self.postfix = s
        >>> class Trainer:
        ...     class progress_bar_callback:
        ...         train_progress_bar = Bar()
        >>> trainer = Trainer()
        >>> with progress_note(trainer, "measuring hessian…"):
        ...     trainer.progress_bar_callback.train_progress_bar.postfix
        'loss=0.1, measuring hessian…'
        >>> trainer.progress_bar_callback.train_progress_bar.postfix
        'loss=0.1'
    """
    callback = getattr(trainer, "progress_bar_callback", None)
    restore = None
    try:
        bar = getattr(callback, "train_progress_bar", None)  # TQDMProgressBar
        if bar is not None and hasattr(bar, "set_postfix_str") and not getattr(bar, "disable", False):
            before = bar.postfix or ""
            bar.set_postfix_str(f"{before}, {text}" if before else text, refresh=True)

            def restore() -> None:
                bar.set_postfix_str(before, refresh=True)

        progress, task = getattr(callback, "progress", None), getattr(callback, "train_progress_bar_id", None)
        if restore is None and progress is not None and task is not None:  # RichProgressBar
            before = progress.tasks[task].description
            progress.update(task, description=f"{before} ({text})")

            def restore() -> None:
                progress.update(task, description=before)
    except Exception:  # a progress bar of another shape: say nothing rather than fail the measurement
        restore = None
    try:
        yield
    finally:
        if restore is not None:
            with contextlib.suppress(Exception):
                restore()
