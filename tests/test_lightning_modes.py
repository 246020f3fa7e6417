"""Lightning's modes: inference_mode, two instances, CSVLogger, no logger."""

from __future__ import annotations

import glob
import warnings

import pytest
import pytorch_lightning as pl
from _lightning import DigitsModule, loaders, trainer

from lightning_landscape import HessianCallback, LossLandscapeCallback


def _callbacks():
    return [
        HessianCallback(every_n_epochs=1, top_k=1, max_hvps=8, density=True, density_steps=4),
        LossLandscapeCallback(every_n_epochs=1, steps=3, steps_1d=3),
    ]


def test_epoch_end_measurements_under_inference_mode(tmp_path):
    train, val = loaders(n_train=64, n_val=64, batch_size=32)
    cbs = _callbacks()
    trainer(tmp_path, cbs, max_epochs=2, inference_mode=True, logger=False).fit(DigitsModule(), train, val)
    for cb in cbs:
        assert cb.last_metrics, type(cb).__name__


def test_two_instances_coexist(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    a = HessianCallback(every_n_train_steps=1, top_k=1)
    b = HessianCallback(every_n_train_steps=2, top_k=2)
    assert a.state_key != b.state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [a, b, ckpt], max_steps=2, enable_checkpointing=True, logger=False).fit(DigitsModule(), train)
    import torch

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["eigenvectors"].shape[0] == 1
    assert saved[b.state_key]["eigenvectors"].shape[0] == 2


def test_csv_logger_gets_scalars_and_png_files(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, _callbacks(), max_epochs=2, logger=logger).fit(DigitsModule(), train)
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "hessian/eigenvalue_1" in metrics and "landscape/center_loss" in metrics
    pngs = sorted(glob.glob(f"{tmp_path}/csv/version_0/images/*.png"))
    names = [p.rsplit("/", 1)[1] for p in pngs]
    assert sum(n.startswith("hessian_spectral_density") for n in names) == 2
    assert sum(n.startswith("landscape_surface_2d") for n in names) == 2
    png_warnings = [w for w in caught if "cannot show images" in str(w.message)]
    assert len(png_warnings) == 2  # once per callback, not per image


def test_no_logger_one_warning(tmp_path):
    train, _ = loaders(n_train=64, batch_size=32)
    cb = HessianCallback(every_n_train_steps=1)
    with pytest.warns(UserWarning, match="no logger") as caught:
        trainer(tmp_path, [cb], max_steps=3, logger=False).fit(DigitsModule(), train)
    assert sum("no logger" in str(w.message) for w in caught) == 1
    assert cb.last_metrics
