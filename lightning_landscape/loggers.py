"""How an image and a text note reach each kind of logger: one small adapter per kind.

Scalars go through every logger's own ``log_metrics``. Images and notes need each logger's own API, so an adapter
is chosen by the logger's class name (either Lightning package's loggers, and subclasses, match):

- ``TensorBoardLogger``: images by ``add_image`` (the Images tab, a slider per tag), notes by ``add_text``, meshes
  (:meth:`LoggerAdapter.mesh`, loss surfaces to rotate in the browser) by ``add_mesh``: TensorBoard only;
- ``WandbLogger``: images by its ``log_image`` (a W&B image under the tag, at the step), notes as a W&B table;
- ``MLFlowLogger``: images by ``MlflowClient.log_image`` (key = tag, at the step; older MLflow: an artifact
  ``images/<tag>_step<N>.png``), notes by ``log_text`` as ``notes/<tag>_step<N>.txt``;
- ``CometLogger``: ``experiment.log_image(image, name=tag, step=step)`` and ``experiment.log_text``;
- any other logger with a ``log_image`` method: ``log_image(key=tag, images=[image], step=step)`` (and its
  ``log_text`` for notes, if it has one);
- the rest (``CSVLogger``, …): a PNG file ``<log_dir>/images/<tag>_step<N>.png`` and a line in
  ``<log_dir>/notes.txt``.

Every logger of the trainer gets everything. A logger with no directory and no image API (rare) gets scalars only,
with one warning.

Example:
    >>> class CSVLogger:   # stands for Lightning's: only the class name and the directory matter here
    ...     log_dir = "/tmp"
    >>> adapter_for(CSVLogger()).kind
    'files'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["LoggerAdapter", "adapter_for"]


def _class_names(logger: object) -> set[str]:
    return {cls.__name__ for cls in type(logger).__mro__}


def _directory(logger: object) -> str | None:
    for name in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, name, None)
        except Exception:  # some loggers compute these lazily and may fail before a run exists
            value = None
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def _png(directory: str, tag: str, step: int, image: np.ndarray) -> str:
    from matplotlib.image import imsave

    path = os.path.join(directory, "images", f"{tag.replace('/', '_')}_step{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    imsave(path, image)
    return path


class LoggerAdapter:
    """Sends images (``HxWx3``/``HxWx4`` uint8 arrays) and text notes to one logger, by its kind.

    Attributes:
        kind: ``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"comet"``, ``"log_image"``, ``"files"`` or ``"none"``.
    """

    def __init__(self, logger: object, kind: str) -> None:
        self.logger = logger
        self.kind = kind

    @property
    def directory(self) -> str | None:
        """The logger's directory, where files go (``None`` if it has none)."""
        return _directory(self.logger)

    # ------------------------------------------------------------------------------------------------ images
    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log ``image`` under ``tag`` at ``step``."""
        {
            "tensorboard": self._tensorboard_image,
            "wandb": self._wandb_image,
            "mlflow": self._mlflow_image,
            "comet": self._comet_image,
            "log_image": self._generic_image,
            "files": self._file_image,
            "none": lambda *a: None,
        }[self.kind](tag, image, step)

    def _tensorboard_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")

    def _wandb_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.logger.log_image(key=tag, images=[image], step=step)

    def _mlflow_image(self, tag: str, image: np.ndarray, step: int) -> None:
        client, run_id = self.logger.experiment, self.logger.run_id
        key = tag.replace("/", "_")
        try:  # MLflow >= 2.16: images with a key and a step (the UI's image slider)
            client.log_image(run_id, image, key=key, step=step)
        except TypeError:  # older MLflow: an artifact file per image
            client.log_image(run_id, image, artifact_file=f"images/{key}_step{step:08d}.png")

    def _comet_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.logger.experiment.log_image(image, name=tag, step=step)

    def _generic_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.logger.log_image(key=tag, images=[image], step=step)

    def _file_image(self, tag: str, image: np.ndarray, step: int) -> None:
        _png(_directory(self.logger) or ".", tag, step, image)

    # ------------------------------------------------------------------------------------------------ meshes
    def mesh(self, tag: str, vertices: np.ndarray, colors: np.ndarray, faces: np.ndarray, step: int) -> bool:
        """Log a triangle mesh (``[1, N, 3]`` float vertices, ``[1, N, 3]`` uint8 colours, ``[1, F, 3]`` int faces,
        e.g. from :func:`~lightning_landscape.plotting.surface_mesh`) to TensorBoard's mesh plugin (rotate and zoom
        in the browser); other kinds of logger have no mesh view and get nothing. Returns whether it was logged.

        Example:
            >>> class CSVLogger:
            ...     log_dir = "/tmp"
            >>> adapter_for(CSVLogger()).mesh("landscape/surface_3d", None, None, None, step=0)
            False
        """
        if self.kind != "tensorboard":
            return False
        import torch

        self.logger.experiment.add_mesh(
            tag,
            vertices=torch.as_tensor(vertices),
            colors=torch.as_tensor(colors),
            faces=torch.as_tensor(faces),
            global_step=step,
        )
        return True

    # ------------------------------------------------------------------------------------------------- notes
    def text(self, tag: str, text: str, step: int) -> None:
        """Log a short text note under ``tag`` at ``step``."""
        logger = self.logger
        if self.kind == "tensorboard":
            logger.experiment.add_text(tag, text, global_step=step)
        elif self.kind == "wandb":
            logger.log_text(key=tag, columns=["step", "note"], data=[[step, text]], step=step)
        elif self.kind == "mlflow":
            logger.experiment.log_text(logger.run_id, text, f"notes/{tag.replace('/', '_')}_step{step:08d}.txt")
        elif self.kind == "comet":
            logger.experiment.log_text(text, step=step, metadata={"tag": tag})
        elif self.kind == "log_image" and callable(getattr(logger, "log_text", None)):
            logger.log_text(key=tag, columns=["step", "note"], data=[[step, text]], step=step)
        elif _directory(logger) is not None:
            path = os.path.join(_directory(logger), "notes.txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"step {step}\t{tag}\t{text}\n")


_KINDS: list[tuple[str, Callable[[object], bool]]] = [
    ("tensorboard", lambda lg: "TensorBoardLogger" in _class_names(lg)),
    ("wandb", lambda lg: "WandbLogger" in _class_names(lg)),
    ("mlflow", lambda lg: "MLFlowLogger" in _class_names(lg)),
    ("comet", lambda lg: "CometLogger" in _class_names(lg)),
    ("log_image", lambda lg: callable(getattr(lg, "log_image", None))),
    ("files", lambda lg: _directory(lg) is not None),
]


def adapter_for(logger: Any) -> LoggerAdapter:
    """The adapter for ``logger``'s kind (see the module docstring's table)."""
    for kind, matches in _KINDS:
        if matches(logger):
            return LoggerAdapter(logger, kind)
    return LoggerAdapter(logger, "none")
