"""The ``lightning-landscape`` command on a tiny run configured in ``tests/cli/config.yaml``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _cli_module import TinyClassifier, TinyDigits
from _models import cross_entropy, dense_hessian

from lightning_landscape import cli

CONFIG = str(Path(__file__).parent / "cli" / "config.yaml")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    """Two checkpoints of the config's run (epochs 1 and 4), trained without measuring."""
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    model, data = TinyClassifier(hidden=8, lr=0.1), TinyDigits(n_train=128, batch_size=32)
    saver = pl.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = pl.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
    )
    trainer.fit(model, data)
    return [str(root / "epoch=0.ckpt"), str(root / "epoch=3.ckpt")]


def probe(n_batches: int) -> list:
    """The batches ``analyze`` measures on: the first of the training loader after ``seed_everything(0)``."""
    pl.seed_everything(0, verbose=False)
    loader = iter(TinyDigits(n_train=128, batch_size=32).train_dataloader())
    return [next(loader) for _ in range(n_batches)]


def test_analyze_writes_the_callbacks_numbers_json_html_and_tensorboard(checkpoints, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["analyze", "--config", CONFIG, "--ckpt_path", checkpoints[1], "--output", str(out)]
    assert cli.main([*args, "--measure", "hessian,landscape", "--no_progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    # the config's HessianCallback (top_k=2, 2 probe batches), on the checkpoint's weights
    model = TinyClassifier.load_from_checkpoint(checkpoints[1]).double()
    batches = [(x.double(), y) for x, y in probe(2)]
    exact = torch.linalg.eigvalsh(dense_hessian(model.net, cross_entropy, batches)).flip(0)
    for i in (1, 2):  # Lanczos stops at 1e-3 relative (the callback's tol); float32 products round at ~1e-6
        assert metrics[f"hessian/eigenvalue_{i}"] == pytest.approx(exact[i - 1].item(), rel=2e-3)
    assert report["global_step"] == 16  # the checkpoint's step: 4 epochs of 4 batches
    # the config's LossLandscapeCallback: 1 probe batch, the same first batch
    assert metrics["landscape/center_loss"] == pytest.approx(cross_entropy(model.net, batches[0]).item(), rel=1e-5)
    assert {"landscape/surface_2d", "landscape/slice_1d"} <= set(report["images"])
    for path in report["images"].values():
        assert (out / path).stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "hessian/eigenvalue_1" in page and "images/landscape_surface_2d.png" in page
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("hessian/eigenvalue_1")] == [16]  # at the checkpoint's step
    assert "hessian/eigenvalue_1" in capsys.readouterr().out  # the table is printed


def test_compare_uses_one_probe_and_one_plane_for_all_checkpoints(checkpoints, tmp_path):
    out = tmp_path / "cmp"
    reports = cli.compare(
        checkpoints, CONFIG, str(out), ["hessian", "sharpness"], names=["early", "late"], progress=False
    )
    assert [r["name"] for r in reports] == ["early", "late"]
    assert (out / "compare.png").stat().st_size > 1000 and (out / "compare.json").exists()
    early, late = (r["metrics"] for r in reports)
    assert early["hessian/eigenvalue_1"] != late["hessian/eigenvalue_1"]
    # analyzing one checkpoint alone gives the same numbers (same probe batches, same seeds)
    alone = cli.analyze(CONFIG, checkpoints[0], str(tmp_path / "alone"), ["hessian", "sharpness"], progress=False)
    for tag, value in early.items():
        if not tag.endswith("/seconds"):
            assert alone["metrics"][tag] == pytest.approx(value, rel=1e-6), tag
    page = (out / "compare.html").read_text()
    assert "early" in page and "late" in page and "compare.png" in page


def test_bad_arguments_say_what_is_accepted(tmp_path):
    with pytest.raises(SystemExit, match="--measure: expected a comma-separated subset of hessian, sharpness"):
        cli.main(["analyze", "--config", CONFIG, "--measure", "hessian,curvature"])
    with pytest.raises(SystemExit, match="--config: no such file"):
        cli.main(["analyze", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit):
        cli.main(["analyze", "--config", CONFIG, "stray"])


def test_console_script_module_runs():
    done = subprocess.run([sys.executable, "-m", "lightning_landscape.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "analyze" in done.stdout and "compare" in done.stdout


def test_trajectory_through_saved_checkpoints(checkpoints, tmp_path):
    import numpy as np

    ckpt_dir = str(Path(checkpoints[0]).parent)
    out = tmp_path / "traj"
    args = ["trajectory", "--config", CONFIG, "--ckpt_dir", ckpt_dir, "--output", str(out), "--steps", "5"]
    assert cli.main([*args, "--no_progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == [4, 8, 12, 16]  # the four checkpoints, by global step
    # explained variance: a dense PCA of the centred differences from the last checkpoint
    flats = []
    for path in report["checkpoints"]:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        flats.append(
            torch.cat(
                [state[k].reshape(-1).double() for k in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")]
            )
        )
    diffs = torch.stack(flats) - flats[-1]
    diffs = (diffs - diffs.mean(0)).numpy()
    s = np.linalg.svd(diffs, compute_uv=False) ** 2
    for i in (1, 2):
        value = report["metrics"][f"landscape/trajectory_explained_variance_{i}"]
        assert value == pytest.approx(s[i - 1] / s.sum(), abs=1e-6)
    saved = np.load(out / "trajectory.npz")
    assert saved["losses"].shape == (5, 5) and np.isfinite(saved["losses"]).all()
    assert (out / "trajectory.png").stat().st_size > 1000 and "trajectory.png" in (out / "report.html").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("landscape/trajectory_explained_variance_1")] == [16]


def test_trajectory_needs_three_checkpoints(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match="at least 3 checkpoints, found 0"):
        cli.main(["trajectory", "--config", CONFIG, "--ckpt_dir", str(tmp_path), "--no_progress"])


def test_the_lightning_package_is_the_models_not_the_first_imported():
    """With both packages imported (the unified one first), the run's LightningCLI is the model's package's."""
    import lightning.pytorch  # noqa: F401

    assert cli._namespace_for(CONFIG, None).__name__ == "pytorch_lightning"  # TinyClassifier's
    assert cli._namespace_for(CONFIG, "_cli_module.TinyClassifier").__name__ == "pytorch_lightning"


@pytest.mark.slow
def test_analyze_under_ddp_two_processes(checkpoints, tmp_path):
    """``--devices 2``: Lightning's DDP relaunches the command; both ranks measure, rank zero writes the report."""
    import os

    out = tmp_path / "ddp"
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "lightning_landscape.cli", "analyze", "--config", CONFIG, "--ckpt_path",
               checkpoints[1], "--output", str(out), "--measure", "hessian", "--devices", "2", "--accelerator",
               "cpu", "--no_progress"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # each rank probes 2 batches of its half of the data; the products are averaged over both ranks' probes
    assert report["global_step"] == 16 and report["metrics"]["hessian/eigenvalue_1"] > 0
    assert done.stdout.count("| hessian/eigenvalue_1 |") == 1  # only rank zero prints the table
