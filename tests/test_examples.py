"""Smoke tests of the examples: each one's ``--fast`` mode runs in-process through its ``main(argv)``.

They check that every example runs end to end, returns (and prints) finite numbers under the names the
README quotes, and writes its files (figures under ``--out``, TensorBoard events, the CLI's saved config).
The numbers themselves are the examples' results, not the library's: they are not compared with values.
"""

from __future__ import annotations

import contextlib
import doctest
import glob
import importlib.util
import io
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


@pytest.fixture(scope="module")
def quickstart_fast(tmp_path_factory) -> tuple[ModuleType, dict[str, float], str, Path]:
    """One ``--fast`` run of both quickstart runs, exporting images: (module, results, printed text, tmp dir)."""
    tmp = tmp_path_factory.mktemp("quickstart")
    module = load("quickstart")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = module.main(["--fast", "--logdir", str(tmp / "logs"), "--export-images", str(tmp / "png")])
    return module, results, out.getvalue(), tmp


def test_quickstart_fast(quickstart_fast):
    module, results, printed, tmp = quickstart_fast
    assert doctest.testmod(module).failed == 0
    for run in ("sgd", "sam"):
        for prefix in ("hessian/", "sharpness/", "landscape/", "generalization/"):
            assert any(k.startswith(f"{run}/{prefix}") for k in results), f"no {run}/{prefix} in {sorted(results)}"
        assert_finite(
            results,
            [f"{run}/{k}" for k in ("val_acc", "flipped_fitted", "train_loss", "weight_norm", "eigenvalue_1", "trace",
                                    "worst_case_l2", "fit_seconds", "hessian/eigenvalue_1", "hessian/trace",
                                    "sharpness/worst_case_l2", "landscape/rise_at_edge", "generalization/gap")],
        )  # fmt: skip
        assert results[f"{run}/worst_case_l2"] >= 0 and 0 <= results[f"{run}/flipped_fitted"] <= 1
        events = glob.glob(f"{tmp}/logs/quickstart/version_0/{run}/events.out.tfevents.*")
        assert events, f"no TensorBoard event file for {run}"
    assert "tensorboard --logdir" in printed


def test_skip_connections_fast(repo_stays_clean, capsys):
    tmp_path = repo_stays_clean
    module = load("skip_connections")
    assert doctest.testmod(module).failed == 0
    results = module.main(["--fast"])
    names = ["train loss", "val accuracy", "top eigenvalue", "most negative eigenvalue", "rise_at_edge",
             "non-convex fraction of slice"]  # fmt: skip
    assert_finite(results, [f"{case}/{name}" for case in ("with skips", "without skips") for name in names])
    assert_png(tmp_path / "skip_connections.png")
    assert_png(tmp_path / "skip_connections_blocks.png")
    blocks = ["stem", "block 1", "block 4", "head"]  # --fast: 4 residual blocks
    assert_finite(results, [f"{case}/λ_max of {b}" for case in ("with skips", "without skips") for b in blocks])
    out = capsys.readouterr().out
    assert "with skips" in out and "without skips" in out and "top eigenvalue" in out and "λ_max of head" in out


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


def test_quickstart_export_images(quickstart_fast):
    """``--export-images`` writes the first (SGD) run's last frame of each image tag, byte for byte."""
    from matplotlib.image import imread

    _, _, printed, tmp = quickstart_fast
    out = tmp / "png"
    logged = last_logged_images(tmp / "logs" / "quickstart" / "version_0" / "sgd")
    assert {"hessian/spectral_density", "landscape/surface_2d", "landscape/slice_1d"} <= set(logged)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"tensorboard_{t.replace('/', '_')}.png" for t in logged)
    for tag, data in logged.items():
        path = out / f"tensorboard_{tag.replace('/', '_')}.png"
        assert_png(path)
        assert path.read_bytes() == data, f"{path} differs from the last {tag} frame in the event file"
        image = imread(path)
        assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 50, image.shape
        assert str(path) in printed


def reading_lines(printed: str) -> dict[str, str]:
    """The reading's lines after ``Reading (...)``, keyed by the text before their first colon."""
    text = printed.split("\nReading (", 1)[1].split("\n\n", 1)[0]
    return {line[2:].split(":", 1)[0]: line for line in text.splitlines()[1:] if line.startswith("- ")}


def check_reading(module: ModuleType, results: dict[str, float], lines: dict[str, str]) -> None:
    """Each measure's line says "lower for <RUN>" of the run whose value is lower, by a ratio of 1.2 or more, and
    "does not separate" otherwise; the summary lists exactly the latter (recomputed here from ``results``)."""
    flat = []
    for key, label in module.COMPARED:
        value = {run: (1 - results[f"{run}/val_acc"] if key == "val_error" else results[f"{run}/{key}"])
                 for run in ("sgd", "sam")}  # fmt: skip
        lo, hi = sorted(value.values())
        separated = lo * hi <= 0 < hi - lo or (lo > 0 and hi / lo >= 1.2)
        line = lines[label]
        if separated:
            lower = min(value, key=value.get).upper()
            assert f"lower for {lower}," in line and "does not separate" not in line, (line, value)
        else:
            assert "does not separate the runs here" in line and "lower for" not in line, (line, value)
            flat.append(label)
        assert f"SGD {value['sgd']:.3g} vs SAM {value['sam']:.3g}" in line, (line, value)
    summary = lines["Not separating the runs (ratio under 1.2x)"]
    assert summary.split(": ", 1)[1].split(". One seed")[0] == (", ".join(flat) or "none"), summary


def test_quickstart_table_and_reading(quickstart_fast):
    module, results, printed, _ = quickstart_fast
    table = printed.split("\nReading (")[0]
    header = [line for line in table.splitlines() if line.split() == ["SGD", "SAM"]]
    assert header, table
    for key, label, fmt in module.ROWS:
        row = next((line for line in table.splitlines() if line.startswith(label)), None)
        assert row is not None, f"no {label!r} row in\n{table}"
        assert row[len(label) :].split() == [format(results[f"{run}/{key}"], fmt) for run in ("sgd", "sam")], row
    assert "128-sample probe of the training set (flipped labels included)" in printed
    assert "Reading (SGD vs SAM)" in printed
    check_reading(module, results, reading_lines(printed))


def test_quickstart_reading_of_given_numbers(capsys):
    """The reading of numbers like the default run's: SAM lower on curvature and on flipped labels fitted, its
    higher training loss read as unfitted noise, the weight norm flagged as not separating."""
    module = load("quickstart")
    numbers = {
        "sgd": dict(val_acc=0.892, flipped_fitted=0.55, train_loss=0.346, train_loss_clean=0.148,
                    train_loss_flipped=1.137, weight_norm=11.86, eigenvalue_1=44.8, trace=458.0, worst_case_l2=0.174),
        "sam": dict(val_acc=0.955, flipped_fitted=0.229, train_loss=0.517, train_loss_clean=0.179,
                    train_loss_flipped=1.869, weight_norm=10.88, eigenvalue_1=18.8, trace=189.0, worst_case_l2=0.0738),
    }  # fmt: skip
    results = {f"{run}/{k}": v for run, values in numbers.items() for k, v in values.items()}
    text = "\n".join(module.reading(results, ["sgd", "sam"], 512, 0.2))
    lines = reading_lines(f"\nReading (SGD vs SAM):\n{text}")
    check_reading(module, results, lines)
    assert "lower for SAM" in lines["λ1"] and "does not separate" in lines["weight norm"]
    assert "SAM's higher training loss (+0.171) is mostly noise it did not fit" in text
    assert "SAM is flatter by 3 of 3 curvature measures and has the lower validation error" in text
    assert "512-sample probe" in text
    # SAM fitting the training set as well, and worse on validation: no noise sentence, flatness did not predict
    results.update({"sam/train_loss": 0.36, "sam/val_acc": 0.80})
    text = "\n".join(module.reading(results, ["sgd", "sam"], 512, 0.2))
    assert "about equally well" in text and "flatness did not predict generalization here" in text
    results.update({"sam/trace": 600.0})  # λ1 and worst-case say SAM, the trace says SGD
    assert "disagree on which run is flatter" in "\n".join(module.reading(results, ["sgd", "sam"], 512, 0.2))


def test_digits_label_noise():
    module = load("quickstart")
    train, val = module.digits_loaders(200, batch_size=50, seed=3, label_noise=0.25)
    again, _ = module.digits_loaders(200, batch_size=50, seed=3, label_noise=0.25)
    clean, clean_val = module.digits_loaders(200, batch_size=50, seed=3)
    data = train.dataset
    assert len(data.flipped) == 50 and data.flipped.equal(again.dataset.flipped)
    labels = data.tensors[1]
    assert (labels[data.flipped] != data.clean_labels[data.flipped]).all()
    assert (labels != data.clean_labels).sum() == 50 and data.clean_labels.equal(clean.dataset.tensors[1])
    assert len(clean.dataset.flipped) == 0 and clean.dataset.tensors[1].equal(clean.dataset.clean_labels)
    assert all(a.equal(b) for a, b in zip(val.dataset.tensors, clean_val.dataset.tensors, strict=True))
    assert not module.digits_loaders(200, 50, seed=4, label_noise=0.25)[0].dataset.flipped.equal(data.flipped)
