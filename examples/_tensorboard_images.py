"""Copy the images a run logged to TensorBoard out of its event files, as PNG files (for the README)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def export_images(log_dir: str | Path, out_dir: str | Path, prefix: str = "tensorboard_") -> list[Path]:
    """Write the last frame of every image tag in a TensorBoard run to ``out_dir`` as a PNG file.

    ``log_dir`` is a run's directory (e.g. ``trainer.logger.log_dir``; every event file directly in it
    is read) or one event file. For each image tag the frame with the highest step is taken (the later
    write wins a tie) and its encoded bytes, the PNG that TensorBoard itself shows, are written
    unchanged to ``out_dir / f"{prefix}{tag}.png"`` with each ``/`` in the tag replaced by ``_``:
    ``hessian/spectral_density`` becomes ``tensorboard_hessian_spectral_density.png``. ``out_dir`` is
    created if needed. Returns the written paths, sorted by tag; an empty list if the run holds no
    images.

    Example, after ``python examples/quickstart.py --fast --logdir /tmp/ll``:
    ``export_images("/tmp/ll/quickstart/version_0", "docs")`` returns
    ``[Path("docs/tensorboard_hessian_spectral_density.png"), Path("docs/tensorboard_landscape_slice_1d.png"),
    Path("docs/tensorboard_landscape_surface_2d.png")]``.
    """
    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})  # 0: keep every frame
    accumulator.Reload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for tag in sorted(accumulator.Tags()["images"]):
        frames = accumulator.Images(tag)
        if not frames:
            continue
        last = max(enumerate(frames), key=lambda item: (item[1].step, item[0]))[1]
        path = out / f"{prefix}{tag.replace('/', '_')}.png"
        path.write_bytes(last.encoded_image_string)
        written.append(path)
    return written
