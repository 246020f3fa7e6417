"""Images and notes reach every logger a Lightning user has, read back from each logger's own storage (issue 13.3).

The loggers' packages (wandb, mlflow-skinny, comet_ml) are test dependencies (the ``test`` extra); a test whose
package is missing is skipped with the reason, never passed. All run offline.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import pytorch_lightning as pl
from _lightning import DigitsModule, loaders, read_events

from lightning_landscape import HessianCallback, LossLandscapeCallback

STEPS = 4  # two measurements: steps 2 and 4


def _callbacks():
    return [
        HessianCallback(every_n_train_steps=2, density=True, density_probes=2, density_steps=4, max_hvps=10),
        LossLandscapeCallback(every_n_train_steps=2, steps=3, steps_1d=3, validation=False),
    ]


def _fit(tmp_path, loggers) -> None:
    train, _ = loaders(n_train=128, batch_size=32)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", max_steps=STEPS, logger=loggers, callbacks=_callbacks(),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(DigitsModule(), train)


IMAGE_TAGS = ("hessian/spectral_density", "landscape/surface_2d", "landscape/slice_1d")


def test_wandb_gets_images_and_the_note(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = pl.loggers.WandbLogger(project="landscape-test", save_dir=str(tmp_path), offline=True)
    _fit(tmp_path, [logger])
    run_dir = logger.experiment.dir  # <save_dir>/wandb/offline-run-…/files
    logger.experiment.finish()
    media = glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True)
    for tag in IMAGE_TAGS:  # W&B names image files after the key, '/' becoming a folder
        assert sum(tag.split("/")[1] in m for m in media) == 2, (tag, media)
    tables = glob.glob(os.path.join(run_dir, "media", "table", "**", "*.json"), recursive=True)
    notes = [json.load(open(t)) for t in tables if "hvp_method" in t]
    assert notes and "double_backward" in json.dumps(notes[0])


def test_mlflow_gets_images_at_their_steps_and_the_note(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store: no database server in the tests
    from mlflow import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    logger = pl.loggers.MLFlowLogger(experiment_name="landscape", tracking_uri=uri)
    _fit(tmp_path, [logger])
    client = MlflowClient(tracking_uri=uri)
    paths = [a.path for a in client.list_artifacts(logger.run_id)]
    everything = []
    stack = list(paths)
    while stack:
        path = stack.pop()
        children = client.list_artifacts(logger.run_id, path)
        stack.extend(c.path for c in children if c.is_dir)
        everything.extend(c.path for c in children if not c.is_dir)
    for tag in IMAGE_TAGS:
        key = tag.replace("/", "_")
        assert len([p for p in everything if key in p and p.endswith(".png")]) >= 2, (tag, everything)
    notes = [p for p in everything if p.startswith("notes/") and "hvp_method" in p]
    assert notes
    text = open(client.download_artifacts(logger.run_id, notes[0], str(tmp_path))).read()
    assert "double_backward" in text
    assert client.get_metric_history(logger.run_id, "hessian/eigenvalue_1")  # scalars as before


def test_comet_offline_gets_images_and_the_note(tmp_path, monkeypatch):
    pytest.importorskip("comet_ml")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "comet"))
    logger = pl.loggers.CometLogger(online=False, project="landscape", offline_directory=str(tmp_path / "comet"))
    calls = {"image": [], "text": []}  # what reached comet_ml's own (offline) experiment, which ran each call
    experiment = logger.experiment
    real_image, real_text = experiment.log_image, experiment.log_text

    def log_image(image, name=None, step=None, **kw):
        calls["image"].append((name, step))
        return real_image(image, name=name, step=step, **kw)

    def log_text(text, step=None, metadata=None, **kw):
        calls["text"].append((text, step, metadata))
        return real_text(text, step=step, metadata=metadata, **kw)

    monkeypatch.setattr(experiment, "log_image", log_image)
    monkeypatch.setattr(experiment, "log_text", log_text)
    _fit(tmp_path, [logger])
    for tag in IMAGE_TAGS:
        assert [s for name, s in calls["image"] if name == tag] == [2, 4], calls["image"]
    assert any(meta == {"tag": "hessian/hvp_method"} and "double_backward" in text for text, _, meta in calls["text"])
    experiment.end()


def test_several_loggers_each_get_everything(tmp_path):
    tb = pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = pl.loggers.CSVLogger(tmp_path, name="csv", version=0)
    _fit(tmp_path, [tb, csv])
    acc = read_events(tmp_path / "tb" / "version_0")
    for tag in IMAGE_TAGS:
        assert [e.step for e in acc.Images(tag)] == [2, 4]
        pngs = glob.glob(str(tmp_path / "csv" / "version_0" / "images" / f"{tag.replace('/', '_')}_step*.png"))
        assert len(pngs) == 2
    notes = open(tmp_path / "csv" / "version_0" / "notes.txt").read()
    assert "hessian/hvp_method" in notes and "double_backward" in notes
    assert "hessian/hvp_method/text_summary" in acc.Tags()["tensors"]  # TensorBoard keeps text as tensors
