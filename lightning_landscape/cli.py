"""``lightning-landscape``: measure checkpoints you already have, from the YAML you trained them with.

Two subcommands (the console script ``lightning-landscape``, or ``python -m lightning_landscape.cli``):

- ``analyze``: loads the module and data from a LightningCLI config (the same YAML as ``fit``), loads a
  checkpoint, measures once (``--measure hessian,sharpness,landscape``) on fixed probe batches of the training
  data, and writes under ``--output``: TensorBoard logs with the callbacks' own tags, ``report.json`` (every
  number) and ``report.html`` (the pictures and the numbers);
- ``compare``: the same measurements for several checkpoints on the same probe batches and the same random
  directions, in one table (printed, and ``compare.json`` / ``compare.html``) and one figure;
- ``trajectory``: the optimizer's path through checkpoints already saved (``ModelCheckpoint(every_n_epochs=1,
  save_top_k=-1)``), on the plane of its top-2 principal directions around the last one (Li et al. 2018, §7):
  ``trajectory.png``, the surface as ``.npz`` (and ``.vtu`` with meshio), TensorBoard image, mesh and scalars,
  ``report.json`` / ``report.html``.

The measurements are the callbacks' (``HessianCallback``, ``SharpnessCallback``, ``LossLandscapeCallback``) run
through ``trainer.validate`` over the training loader, so their settings come from the config's
``trainer.callbacks`` when it has them (otherwise their defaults), and ``--devices N`` measures under Lightning's
DDP. The config's model and data need ``class_path`` entries (what ``LightningCLI`` writes with
``--print_config``), or name the classes with ``--model_class`` / ``--datamodule_class``. Arguments the
command does not know are passed to LightningCLI as overrides (``--model.width=4``).

Example:
    >>> parser = build_parser()
    >>> args = parser.parse_args(["analyze", "--config", "fit.yaml", "--ckpt_path", "last.ckpt"])
    >>> args.command, args.measure, args.output
    ('analyze', 'hessian,sharpness,landscape', 'landscape_report')
"""

from __future__ import annotations

import argparse
import copy
import html
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from lightning_landscape._lightning import NAMESPACES, default_namespace, namespace_of

__all__ = ["MEASUREMENTS", "analyze", "build_parser", "compare", "main", "trajectory"]

#: ``--measure`` names and the callback class each runs
MEASUREMENTS = {
    "hessian": "HessianCallback",
    "sharpness": "SharpnessCallback",
    "landscape": "LossLandscapeCallback",
}

#: the numbers ``compare`` draws in its figure, when measured (the table holds all)
HEADLINE = (
    "hessian/eigenvalue_1",
    "hessian/trace",
    "sharpness/worst_case_l2",
    "sharpness/average_case_l2",
    "landscape/rise_at_edge",
)


# ------------------------------------------------------------------------------------------------ loading
def _namespace_for(config: str, model_class: str | None) -> ModuleType:
    """The Lightning package of the run's LightningModule: that of ``model_class``, or of the config's
    ``model.class_path``; else the one the config's class paths name; else the default one."""
    text = Path(config).read_text(encoding="utf-8")
    path = model_class
    if path is None:
        try:
            import yaml

            model = (yaml.safe_load(text) or {}).get("model")
            path = model.get("class_path") if isinstance(model, dict) else None
        except Exception:  # an unreadable config: LightningCLI will say what is wrong with it
            path = None
    if isinstance(path, str) and "." in path:
        try:
            return namespace_of(_import(path, "--model_class" if model_class else "--config model.class_path"))
        except SystemExit:
            if model_class is not None:
                raise
    for name in NAMESPACES:
        if name + "." in text:
            try:
                return importlib.import_module(name)
            except ImportError:
                continue
    return default_namespace()


def _import(path: str, option: str) -> type:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SystemExit(f"{option}: cannot import {path!r} ({err}).") from None


def load_from_config(
    config: str,
    overrides: Sequence[str] = (),
    model_class: str | None = None,
    datamodule_class: str | None = None,
) -> tuple[Any, Any, list[Any], ModuleType]:
    """The module, the data module (or ``None``) and the trainer's configured callbacks a LightningCLI config
    describes, and the Lightning package it uses. Nothing is trained."""
    if not Path(config).is_file():
        raise SystemExit(f"--config: no such file {config!r}.")
    ns = _namespace_for(config, model_class)
    try:
        cli_module = importlib.import_module(f"{ns.__name__}.cli")
        cli_module.LightningCLI.__init__  # noqa: B018 (LightningCLI needs jsonargparse: fail here, not later)
        importlib.import_module("jsonargparse")
    except ImportError as err:
        raise SystemExit(
            f"lightning-landscape needs LightningCLI's parser ({err}): pip install 'lightning-landscape[cli]'."
        ) from None
    model_cls = _import(model_class, "--model_class") if model_class else ns.LightningModule
    text = Path(config).read_text(encoding="utf-8")
    has_data = datamodule_class is not None or any(line.startswith("data:") for line in text.splitlines())
    data_cls = _import(datamodule_class, "--datamodule_class") if datamodule_class else ns.LightningDataModule
    try:
        cli = cli_module.LightningCLI(
            model_cls,
            data_cls if has_data else None,
            subclass_mode_model=model_class is None,
            subclass_mode_data=datamodule_class is None,
            run=False,
            args=["--config", config, *overrides],
            save_config_callback=None,
            trainer_defaults={"logger": False, "enable_checkpointing": False, "enable_progress_bar": False},
        )
    except SystemExit as err:
        hint = (
            "" if model_class else " If the config's `model:` has no `class_path`, name the class with --model_class."
        )
        raise SystemExit(f"--config {config}: LightningCLI could not build the run (exit {err.code}).{hint}") from None
    return cli.model, cli.datamodule, list(cli.trainer.callbacks), ns


def _measurement_callbacks(measure: Sequence[str], configured: Sequence[Any], num_samples: int | None) -> list[Any]:
    """One callback per measurement: a copy of the config's own instance when it has one, else the default."""
    import lightning_landscape

    callbacks = []
    for name in measure:
        cls_name = MEASUREMENTS[name]
        mine = next((cb for cb in configured if type(cb).__name__ == cls_name), None)
        if mine is not None:
            callbacks.append(copy.deepcopy(mine))
        else:
            kwargs = {"num_samples": num_samples} if num_samples is not None else {}
            callbacks.append(getattr(lightning_landscape, cls_name)(**kwargs))
    return callbacks


def _parse_measure(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in names if m not in MEASUREMENTS]
    if not names or bad:
        raise SystemExit(f"--measure: expected a comma-separated subset of {', '.join(MEASUREMENTS)}, got {value!r}.")
    return names


# ------------------------------------------------------------------------------------------- measuring
def _report_logger(ns: ModuleType, directory: Path) -> Any:
    """A logger of ``ns`` that keeps every scalar and saves every image as a PNG under ``directory/images``."""

    class ReportLogger(ns.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.metrics: dict[str, float] = {}
            self.images: dict[str, str] = {}
            self.notes: dict[str, str] = {}

        @property
        def name(self) -> str:
            return "report"

        @property
        def version(self) -> int:
            return 0

        @property
        def log_dir(self) -> str:
            return str(directory)

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.metrics.update({k: float(v) for k, v in metrics.items()})

        def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
            from matplotlib.image import imsave

            path = directory / "images" / f"{key.replace('/', '_')}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            imsave(path, images[0])
            self.images[key] = str(path.relative_to(directory))

        def log_text(self, key: str, columns: list[str], data: list[list[Any]], step: int | None = None) -> None:
            self.notes[key] = str(data[-1][-1])

    return ReportLogger()


def _runner(ns: ModuleType, callbacks: list[Any], progress: bool) -> Any:
    """A callback placed before the measurement callbacks: at the end of ``validate`` it says what the run will
    cost (one timed probe gradient times each measurement's work), then runs each measurement with a progress
    bar (the callbacks' own end-of-validation hooks then find nothing left to do)."""

    class Runner(ns.Callback):
        estimate: float = 0.0
        step: int = 0  # the checkpoint's global_step, which the measurements are logged at

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            from tqdm.auto import tqdm

            steps = [cb._checkpoint_step for cb in callbacks if cb._checkpoint_step is not None]
            self.step = steps[0] if steps else int(trainer.global_step)

            estimates = []
            for cb in callbacks:
                cb._probe = cb._posthoc_batches
                try:
                    estimates.append(cb._estimate_cost(trainer, pl_module) if cb._probe else 0.0)
                finally:
                    cb._probe = None
            self.estimate = sum(estimates)
            disable = not progress or not trainer.is_global_zero
            if not disable:
                parts = ", ".join(f"{cb.prefix} ~{e:.1f} s" for cb, e in zip(callbacks, estimates, strict=True))
                tqdm.write(f"lightning-landscape: estimated {self.estimate:.1f} s ({parts})")
            bar = tqdm(callbacks, desc="measuring", unit="measurement", disable=disable, leave=False)
            for cb in bar:
                bar.set_postfix_str(cb.prefix)
                cb._measure_posthoc(trainer, pl_module)

    return Runner()


def _probe_batches(loader: Any, num_samples: int) -> int | None:
    size = getattr(loader, "batch_size", None)
    return max(1, math.ceil(num_samples / size)) if isinstance(size, int) and size > 0 else None


def _without_validation_step(model: Any) -> None:
    """``trainer.validate`` needs a ``validation_step``; the measurements need none of its work: a no-op one."""

    def validation_step(self: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        return None

    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"validation_step": validation_step, "__module__": cls.__module__})


def analyze(
    config: str,
    ckpt_path: str | None,
    output: str,
    measure: Sequence[str] = ("hessian", "sharpness", "landscape"),
    *,
    overrides: Sequence[str] = (),
    model_class: str | None = None,
    datamodule_class: str | None = None,
    num_samples: int = 256,
    accelerator: str = "auto",
    devices: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure one checkpoint post hoc; writes TensorBoard logs, ``report.json`` and ``report.html`` under
    ``output`` and returns the report (``metrics``: every logged number by tag; ``images``: PNG paths by tag).

    ``num_samples`` sizes the probe of callbacks the config does not configure itself; the probe is the first
    batches of the training loader after ``seed_everything(seed)`` (the same batches for every checkpoint).
    """
    model, datamodule, configured, ns = load_from_config(config, overrides, model_class, datamodule_class)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    callbacks = _measurement_callbacks(measure, configured, num_samples)
    report_logger = _report_logger(ns, out)
    tensorboard = ns.loggers.TensorBoardLogger(str(out), name="tensorboard", version="")
    if datamodule is not None:
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    else:
        loader = model.train_dataloader()
    needed = [
        cb.num_batches if cb.num_batches is not None else _probe_batches(loader, cb.num_samples) for cb in callbacks
    ]
    limit = max((n for n in needed if n is not None), default=None) if None not in needed else 1.0
    _without_validation_step(model)
    ns.seed_everything(seed, verbose=False)
    runner = _runner(ns, callbacks, progress)
    trainer = ns.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=[tensorboard, report_logger],
        callbacks=[runner, *callbacks],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=limit,
        default_root_dir=str(out),
    )
    start = time.perf_counter()
    with warnings.catch_warnings():  # Lightning's advice for real validation runs, not for a probe of training data
        warnings.filterwarnings("ignore", message=".*sampler has shuffling enabled.*")
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        trainer.validate(model, dataloaders=loader, ckpt_path=ckpt_path, verbose=False)
    report = {
        "checkpoint": ckpt_path,
        "config": config,
        "measure": list(measure),
        "global_step": runner.step,
        "estimated_seconds": runner.estimate,
        "seconds": time.perf_counter() - start,
        "metrics": dict(sorted(report_logger.metrics.items())),
        "images": report_logger.images,
        "notes": report_logger.notes,
    }
    if trainer.is_global_zero:
        (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        (out / "report.html").write_text(_html(f"lightning-landscape: {ckpt_path}", [report]), encoding="utf-8")
    return report


def compare(
    ckpt_paths: Sequence[str],
    config: str,
    output: str,
    measure: Sequence[str] = ("hessian", "sharpness", "landscape"),
    names: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`analyze` for each checkpoint (into ``output/<name>``) on the same probe, then one table
    (``compare.json``, ``compare.html``, returned as the list of reports) and one figure (``compare.png``)."""
    if names is not None and len(names) != len(ckpt_paths):
        raise SystemExit(f"--names: {len(names)} names for {len(ckpt_paths)} checkpoints.")
    names = list(names) if names is not None else _short_names(ckpt_paths)
    out = Path(output)
    reports = []
    for name, ckpt in zip(names, ckpt_paths, strict=True):
        report = analyze(config, ckpt, str(out / name), measure, **kwargs)
        report["name"] = name
        for tag, path in report["images"].items():
            report["images"][tag] = f"{name}/{path}"
        reports.append(report)
    (out / "compare.json").write_text(json.dumps(reports, indent=2), encoding="utf-8")
    figure = compare_figure(reports)
    if figure is not None:
        figure.savefig(out / "compare.png", dpi=100)
    (out / "compare.html").write_text(
        _html("lightning-landscape: compare", reports, figure="compare.png" if figure is not None else None),
        encoding="utf-8",
    )
    return reports


def _checkpoints_in(ckpt_dir: str) -> list[tuple[int, Path]]:
    """``(global_step, path)`` of every ``*.ckpt`` in ``ckpt_dir``, by step (then name). Each file is memory-mapped
    to read its step, so no weights are held (they are read one checkpoint at a time, when snapshotted)."""
    import torch

    paths = sorted(Path(ckpt_dir).glob("*.ckpt")) if Path(ckpt_dir).is_dir() else []
    if len(paths) < 3:
        raise SystemExit(
            f"--ckpt_dir: a path needs at least 3 checkpoints, found {len(paths)} in {ckpt_dir!r} (save them with "
            "ModelCheckpoint(every_n_epochs=1, save_top_k=-1))."
        )
    found = []
    for path in paths:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        found.append((int(checkpoint.get("global_step", 0)), path))
        del checkpoint
    return sorted(found, key=lambda item: (item[0], item[1].name))


def _probe_from(loader: Any, num_samples: int) -> list[Any]:
    """The first batches of ``loader`` holding at least ``num_samples`` samples."""
    from lightning_landscape.functional._batches import batch_size

    batches, held = [], 0
    for batch in loader:
        batches.append(batch)
        held += batch_size(batch)
        if held >= num_samples:
            break
    return batches


def trajectory(
    config: str,
    ckpt_dir: str,
    output: str,
    *,
    overrides: Sequence[str] = (),
    model_class: str | None = None,
    datamodule_class: str | None = None,
    num_samples: int = 256,
    steps: int = 21,
    margin: float = 0.2,
    accelerator: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The path through the checkpoints in ``ckpt_dir`` on its PCA plane around the last one, with the training
    loss (the module's ``training_step``) on that plane; writes the picture, the surface, TensorBoard logs and a
    report under ``output`` and returns the report. Snapshots go to ``output/snapshots`` (on disk, not in memory)."""
    import torch
    from tqdm.auto import tqdm

    from lightning_landscape._user_state import invisible_user_code
    from lightning_landscape.callbacks._base import training_step_loss
    from lightning_landscape.functional import ParamSpec, save_surface
    from lightning_landscape.functional._batches import apply_to_tensors
    from lightning_landscape.functional.trajectory import SnapshotStore, trajectory_pca, trajectory_surface
    from lightning_landscape.loggers import adapter_for
    from lightning_landscape.plotting import figure_to_array, surface_mesh, trajectory_figure

    model, datamodule, _, ns = load_from_config(config, overrides, model_class, datamodule_class)
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise SystemExit(f"--accelerator: trajectory runs on 'cpu', 'gpu' or 'auto', got {accelerator!r}.")
    want_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_gpu else "cpu")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = _checkpoints_in(ckpt_dir)
    model.to(device)
    spec = ParamSpec(model)
    store = SnapshotStore(out / "snapshots")
    start = time.perf_counter()
    for step, path in tqdm(checkpoints, desc="snapshots", unit="checkpoint", disable=not progress, leave=False):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["state_dict"])
        store.add(spec.parameter_vector(), step)
    plane = trajectory_pca(store, spec.parameter_vector())  # around the last checkpoint, which the model now holds
    if datamodule is not None:
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    else:
        loader = model.train_dataloader()
    ns.seed_everything(seed, verbose=False)
    batches = [apply_to_tensors(b, lambda t: t.to(device)) for b in _probe_from(loader, num_samples)]
    if progress:
        tqdm.write(f"lightning-landscape: {steps}x{steps} grid on {len(batches)} probe batch(es)")
    with invisible_user_code(model):
        surface = trajectory_surface(model, training_step_loss, batches, plane, steps=steps, margin=margin)
    figure = trajectory_figure(
        surface.x, surface.y, surface.losses, plane.coords, plane.steps, plane.explained_variance,
        title=f"Optimizer trajectory through {len(plane.steps)} checkpoints",
    )  # fmt: skip
    figure.savefig(out / "trajectory.png", dpi=100)
    written = [save_surface(surface, out / "trajectory.npz")]
    if importlib.util.find_spec("meshio") is not None:
        written.append(save_surface(surface, out / "trajectory.vtu"))
    variance = [float(v) for v in plane.explained_variance]
    last = plane.steps[-1]
    metrics = {
        "landscape/trajectory_explained_variance_1": variance[0],
        "landscape/trajectory_explained_variance_2": variance[1],
        "landscape/trajectory/seconds": time.perf_counter() - start,
    }
    tensorboard = ns.loggers.TensorBoardLogger(str(out), name="tensorboard", version="")
    tensorboard.log_metrics(metrics, step=last)
    adapter = adapter_for(tensorboard)
    adapter.image("landscape/trajectory", figure_to_array(figure), last)
    adapter.mesh("landscape/trajectory_3d", *surface_mesh(surface.x, surface.y, surface.losses), step=last)
    tensorboard.finalize("success")
    report = {
        "ckpt_dir": ckpt_dir,
        "config": config,
        "checkpoints": [str(p) for _, p in checkpoints],
        "steps": list(plane.steps),
        "global_step": last,
        "metrics": metrics,
        "images": {"landscape/trajectory": "trajectory.png"},
        "surface": [str(Path(p).relative_to(out)) for p in written],
        "notes": {},
        "name": "trajectory",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.html").write_text(
        _html(f"lightning-landscape: trajectory of {ckpt_dir}", [report]), encoding="utf-8"
    )
    return report


def _short_names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i}_{s}" for i, s in enumerate(stems)]


# ------------------------------------------------------------------------------------------- reporting
def table(reports: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one row per number (measurement tags, ``…/seconds`` last), one column per report.

    Example:
        >>> print(table([{"name": "a", "metrics": {"hessian/trace": 2.0}}, {"name": "b", "metrics": {}}]))
        | | a | b |
        |---|---|---|
        | hessian/trace | 2 | – |
    """
    tags = sorted({t for r in reports for t in r["metrics"]}, key=lambda t: (t.endswith("/seconds"), t))
    names = [r.get("name", str(i)) for i, r in enumerate(reports)]
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for tag in tags:
        cells = [f"{r['metrics'][tag]:.4g}" if tag in r["metrics"] else "–" for r in reports]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_figure(reports: Sequence[dict[str, Any]]) -> Any:
    """Bars of the headline numbers (:data:`HEADLINE`, those measured), one panel per number, one bar per report;
    ``None`` when none of them was measured."""
    tags = [t for t in HEADLINE if any(t in r["metrics"] for r in reports)]
    if not tags:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(tags), 3.0), layout="constrained")
    names = [r.get("name", str(i)) for i, r in enumerate(reports)]
    for i, tag in enumerate(tags):
        ax = fig.add_subplot(1, len(tags), i + 1)
        values = [r["metrics"].get(tag, math.nan) for r in reports]
        ax.bar(range(len(values)), values, color=[f"C{j}" for j in range(len(values))])
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
        ax.set_title(tag, fontsize=9)
    return fig


def _html(title: str, reports: Sequence[dict[str, Any]], figure: str | None = None) -> str:
    """A static page: the table of numbers, then each report's pictures."""
    rows = []
    for line in table(reports).splitlines():
        if line.startswith("|---"):
            continue
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        tag = "th" if not rows else "td"
        rows.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:48%;margin:4px}</style>",
        f"</head><body><h1>{html.escape(title)}</h1><table>{''.join(rows)}</table>",
    ]
    if figure:
        parts.append(f"<h2>Side by side</h2><img src='{html.escape(figure)}' style='max-width:100%'>")
    for i, r in enumerate(reports):
        parts.append(f"<h2>{html.escape(str(r.get('name', r.get('checkpoint') or i)))}</h2>")
        parts.append(f"<p>checkpoint {html.escape(str(r.get('checkpoint')))}, step {r.get('global_step')}</p>")
        for tag, path in r["images"].items():
            parts.append(f"<figure style='display:inline-block'><img src='{html.escape(path)}'>")
            parts.append(f"<figcaption>{html.escape(tag)}</figcaption></figure>")
        for tag, note in r.get("notes", {}).items():
            parts.append(f"<p><code>{html.escape(tag)}</code>: {html.escape(note)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ command
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the LightningCLI YAML the run was trained with")
    p.add_argument("--measure", default="hessian,sharpness,landscape", help=f"subset of {','.join(MEASUREMENTS)}")
    p.add_argument("--output", default="landscape_report", help="folder for logs, JSON and HTML")
    p.add_argument("--num_samples", type=int, default=256, help="probe size for callbacks the config leaves out")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=int, default=1, help="N > 1: Lightning's DDP over N devices")
    p.add_argument("--seed", type=int, default=0, help="seed_everything before taking the probe batches")
    p.add_argument("--model_class", help="the LightningModule class, if the config's model has no class_path")
    p.add_argument("--datamodule_class", help="the LightningDataModule class, if the config's data has none")
    p.add_argument("--no_progress", action="store_true", help="no estimate and no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-landscape`` argument parser (unknown ``--model.x=…`` style options go to LightningCLI)."""
    parser = argparse.ArgumentParser(prog="lightning-landscape", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="measure one checkpoint")
    _common(a)
    a.add_argument("--ckpt_path", help="the checkpoint (default: the config's freshly initialized weights)")
    c = sub.add_parser("compare", help="measure several checkpoints side by side")
    c.add_argument("ckpt_paths", nargs="+", help="checkpoints to compare")
    c.add_argument("--names", help="comma-separated labels, one per checkpoint")
    _common(c)
    t = sub.add_parser("trajectory", help="the path through saved checkpoints on its PCA plane")
    t.add_argument("--ckpt_dir", required=True, help="folder of the run's checkpoints (at least 3)")
    t.add_argument("--steps", type=int, default=21, help="grid points per axis of the plane")
    t.add_argument("--margin", type=float, default=0.2, help="grid beyond the path, as a share of its span")
    _common(t)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-landscape`` console script."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "." not in o.split("=")[0]]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (LightningCLI overrides look like --model.width=4)")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    kwargs: dict[str, Any] = dict(
        overrides=overrides,
        model_class=args.model_class,
        datamodule_class=args.datamodule_class,
        num_samples=args.num_samples,
        accelerator=args.accelerator,
        seed=args.seed,
        progress=not args.no_progress,
    )
    if args.command == "trajectory":
        if args.devices != 1:
            parser.error("--devices: trajectory runs on one device")
        reports = [trajectory(args.config, args.ckpt_dir, args.output, steps=args.steps, margin=args.margin, **kwargs)]
        where = os.path.join(args.output, "report.html")
    else:
        measure = _parse_measure(args.measure)
        kwargs["devices"] = args.devices
        if args.command == "analyze":
            reports = [analyze(args.config, args.ckpt_path, args.output, measure, **kwargs)]
            reports[0]["name"] = Path(args.ckpt_path).stem if args.ckpt_path else "initial"
            where = os.path.join(args.output, "report.html")
        else:
            names = args.names.split(",") if args.names else None
            reports = compare(args.ckpt_paths, args.config, args.output, measure, names, **kwargs)
            where = os.path.join(args.output, "compare.html")
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        print(table(reports))
        print(f"\nReport: {where}  (TensorBoard: tensorboard --logdir {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
