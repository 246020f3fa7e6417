"""The optimizer's path on the loss landscape (Li et al. 2018, §7), drawn while training.

The quickstart's CNN on digits (SGD, momentum 0.9) with ``TrajectoryCallback``: a snapshot of the weights at every
step (kept on disk, thinned past ``max_snapshots``), and at the end of every epoch (and of the fit) the path
projected on its top-2 principal directions, over the loss on that plane. TensorBoard shows the image
``landscape/trajectory`` (the explained variance of each direction in the axis labels: the plane is a faithful
picture of the path only when the two add up to nearly 1) and a 3D mesh of the plane you can turn
(``landscape/trajectory_3d``, Mesh tab). The last plane is exported with ``LF.save_surface`` as ``.npz`` and, when
meshio is installed, ``.vtu`` for ParaView.

    python examples/trajectory.py                 # ~30 s on a laptop CPU
    python examples/trajectory.py --fast          # a few seconds (the CI smoke test)
    python examples/trajectory.py --export-images docs   # README's picture
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tensorboard_images import export_images
from quickstart import DigitsCNN, digits_loaders

from lightning_landscape import TrajectoryCallback
from lightning_landscape import functional as LF


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=21, help="grid points per axis of the plane")
    parser.add_argument("--fast", action="store_true", help="tiny and short: a smoke test")
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--out", default="example_figures", help="where the exported surface goes")
    parser.add_argument("--export-images", metavar="DIR", help="save the run's logged images as PNGs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    n_train, epochs, steps = (256, 2, 5) if args.fast else (1400, args.epochs, args.steps)
    train, val = digits_loaders(n_train, batch_size=32, seed=args.seed)
    trajectory = TrajectoryCallback(every_n_epochs=1, steps=steps, num_samples=256, max_snapshots=64)
    logger = pl.loggers.TensorBoardLogger(args.logdir, name="trajectory")
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[trajectory],
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(DigitsCNN(lr=args.lr, width=4 if args.fast else 16), train, val)

    surface = trajectory.last_surface
    variance = [float(v) for v in surface.plane.explained_variance]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = [LF.save_surface(surface, out / "trajectory.npz")]
    if importlib.util.find_spec("meshio") is not None:
        written.append(LF.save_surface(surface, out / "trajectory.vtu"))
    print(
        f"{len(surface.plane.steps)} snapshots (steps {surface.plane.steps[0]}..{surface.plane.steps[-1]}); "
        f"explained variance {variance[0]:.3f} + {variance[1]:.3f} = {sum(variance):.3f}"
    )
    print("surface written to " + ", ".join(str(p) for p in written))
    if args.export_images:
        for path in export_images(logger.log_dir, args.export_images):
            print(f"wrote {path}")
    return {
        "explained_variance_1": variance[0],
        "explained_variance_2": variance[1],
        "snapshots": len(surface.plane.steps),
    }


if __name__ == "__main__":
    main()
