"""Smoke tests of the examples: each one's ``--fast`` mode runs in-process through its ``main(argv)``.

They check that every example runs end to end, returns (and prints) finite numbers under the names the
README quotes, and writes its files (figures under ``--out``, TensorBoard events, the CLI's saved config).
The numbers themselves are the examples' results, not the library's: they are not compared with values.
"""

from __future__ import annotations

import doctest
import glob
import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MAX_PNG_BYTES = 200_000

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_finite(results: dict[str, float], expected: list[str]) -> None:
    missing = [k for k in expected if k not in results]
    assert not missing, f"missing results {missing}; got {sorted(results)}"
    bad = {k: v for k, v in results.items() if not math.isfinite(v)}
    assert not bad, f"non-finite results: {bad}"


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) < MAX_PNG_BYTES, f"{path} is {len(data)} bytes"


@pytest.fixture
def repo_stays_clean(monkeypatch):
    """Run from the repository root with the examples' default outputs; afterwards ``git status`` is unchanged
    (their figures go to the ignored example_figures/, never over the tracked docs/*.png)."""
    import subprocess

    root = EXAMPLES.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout

    before = status()
    monkeypatch.chdir(root)
    yield root / "example_figures"
    assert status() == before, "an example changed the repository's files"


def test_quickstart_fast(tmp_path, capsys):
    results = load("quickstart").main(["--fast", "--logdir", str(tmp_path)])
    for prefix in ("hessian/", "sharpness/", "landscape/", "generalization/"):
        assert any(k.startswith(prefix) for k in results), f"no {prefix} result in {sorted(results)}"
    assert_finite(
        results,
        ["hessian/eigenvalue_1", "hessian/trace", "sharpness/worst_case_l2", "landscape/rise_at_edge",
         "generalization/gap"],
    )  # fmt: skip
    assert glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True), "no TensorBoard event file"
    assert "tensorboard --logdir" in capsys.readouterr().out


def test_skip_connections_fast(repo_stays_clean, capsys):
    tmp_path = repo_stays_clean
    module = load("skip_connections")
    assert doctest.testmod(module).failed == 0
    results = module.main(["--fast"])
    names = ["train loss", "val accuracy", "top eigenvalue", "most negative eigenvalue", "rise_at_edge",
             "non-convex fraction of slice"]  # fmt: skip
    assert_finite(results, [f"{case}/{name}" for case in ("with skips", "without skips") for name in names])
    assert_png(tmp_path / "skip_connections.png")
    out = capsys.readouterr().out
    assert "with skips" in out and "without skips" in out and "top eigenvalue" in out


def test_batch_size_fast(repo_stays_clean, capsys):
    tmp_path = repo_stays_clean
    results = load("batch_size").main(["--fast"])
    names = ["gap (val − train loss)", "worst-case l2 sharpness ρ=.05", "keskar sharpness ε=1e-3",
             "top Hessian eigenvalue"]  # fmt: skip
    assert_finite(results, [f"batch {bs}/{name}" for bs in (16, 128) for name in names])
    assert results["batch 16/worst-case l2 sharpness ρ=.05"] >= 0  # a maximum over a set holding δ = 0
    assert_png(tmp_path / "batch_size.png")
    assert "keskar sharpness" in capsys.readouterr().out


def test_device_modeling_fast(repo_stays_clean, capsys):
    tmp_path = repo_stays_clean
    module = load("device_modeling")
    assert doctest.testmod(module).failed == 0
    results = module.main(["--fast"])
    names = ["gap (test − train)", "RMS error vs truth (decades)", "worst-case l2 sharpness ρ=.05",
             "top Hessian eigenvalue"]  # fmt: skip
    assert_finite(results, [f"{case}/{name}" for case in ("plain (Adam)", "SAM (ρ=0.05)") for name in names])
    assert_png(tmp_path / "device_modeling.png")
    assert "SAM (ρ=0.05)" in capsys.readouterr().out


def test_cli_fast(tmp_path, capsys):
    argv = [
        "fit",
        "--config", str(EXAMPLES / "config.yaml"),
        "--fast",
        "--model.sam=true",
        "--model.sam_rho=0.1",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    results = load("cli").main(argv)
    assert_finite(
        results,
        ["hessian/eigenvalue_1", "hessian/trace", "sharpness/worst_case_l2", "sharpness/average_case_l2",
         "landscape/rise_at_edge", "generalization/gap"],
    )  # fmt: skip
    assert glob.glob(f"{tmp_path}/**/events.out.tfevents.*", recursive=True), "no TensorBoard event file"
    saved = glob.glob(f"{tmp_path}/**/config.yaml", recursive=True)
    assert saved, "LightningCLI saved no config"
    text = Path(saved[0]).read_text()
    assert "sam: true" in text and "sam_rho: 0.1" in text and "lightning_landscape.SharpnessCallback" in text
    assert "sam=True" in capsys.readouterr().out


def last_logged_images(log_dir: Path) -> dict[str, bytes]:
    """Each image tag's PNG bytes at its highest step, read from the raw event protos (not EventAccumulator)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    last: dict[str, tuple[int, bytes]] = {}
    for file in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in LegacyEventFileLoader(file).Load():
            for value in event.summary.value:
                if value.HasField("image") and event.step >= last.get(value.tag, (-1, b""))[0]:
                    last[value.tag] = (event.step, value.image.encoded_image_string)
    return {tag: data for tag, (_, data) in last.items()}


def test_quickstart_export_images(tmp_path, capsys):
    from matplotlib.image import imread

    out = tmp_path / "png"
    load("quickstart").main(["--fast", "--logdir", str(tmp_path / "logs"), "--export-images", str(out)])
    (log_dir,) = glob.glob(f"{tmp_path}/logs/quickstart/version_*")
    logged = last_logged_images(Path(log_dir))
    assert {"hessian/spectral_density", "landscape/surface_2d", "landscape/slice_1d"} <= set(logged)
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(f"tensorboard_{t.replace('/', '_')}.png" for t in logged)
    for tag, data in logged.items():
        path = out / f"tensorboard_{tag.replace('/', '_')}.png"
        assert_png(path)
        assert path.read_bytes() == data, f"{path} differs from the last {tag} frame in the event file"
        image = imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 50, image.shape
        assert str(path) in printed

