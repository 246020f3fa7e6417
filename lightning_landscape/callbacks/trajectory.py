"""``TrajectoryCallback``: the optimizer's path drawn on the loss landscape (Li et al. 2018, §7)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info

from lightning_landscape._lightning import LightningModule, Trainer
from lightning_landscape.callbacks._base import LossFn, MeasurementCallback, check_bool, check_positive_int
from lightning_landscape.functional import MeasurementError
from lightning_landscape.functional._params import ParamSpec
from lightning_landscape.functional._sharded import is_sharded
from lightning_landscape.functional.surface import _sharded_layout
from lightning_landscape.functional.trajectory import (
    SnapshotStore,
    TrajectorySurface,
    trajectory_pca,
    trajectory_surface,
)
from lightning_landscape.plotting import surface_mesh, trajectory_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SNAPSHOT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class TrajectoryCallback(MeasurementCallback):
    """Keeps snapshots of the weights along training and draws the path on the plane of its top-2 principal
    directions, over the loss on that plane (Li et al. 2018, §7).

    **Snapshots** (cheap copies) are written to disk, one file each, under ``directory`` (default
    ``<trainer.log_dir>/trajectory``): the initial weights, then every ``snapshot_every_n_train_steps`` optimizer
    steps or ``snapshot_every_n_epochs`` epochs (default: every step), and the final weights. Memory does not grow
    with their number. When more than ``max_snapshots`` are kept, every other one is dropped (the first stays) and
    the interval doubles, so a run of any length ends with between ``max_snapshots / 2`` and ``max_snapshots``
    evenly spaced snapshots, and disk use is bounded (the bound is logged once, as a note). Dropped files are
    deleted at the next checkpoint save (so the last checkpoint never refers to a deleted file), at the next
    thinning, or at once when the trainer saves no checkpoints.

    **The plane** (the expensive measurement: ``steps²`` forward passes over the probe) is drawn on the schedule
    ``every_n_train_steps`` / ``every_n_epochs`` / ``max_overhead`` and always at the end of the fit:
    :func:`~lightning_landscape.functional.trajectory.trajectory_pca` of the snapshots around the current weights
    (through their Gram matrix, cached between planes, never all in memory), then
    :func:`~lightning_landscape.functional.trajectory.trajectory_surface` on a grid spanning the path with a
    ``margin``. The directions are not filter-normalized.

    Logged: image ``landscape/trajectory`` (contours, the path as dots coloured by step, the explained variance of
    each direction in the axis labels), a TensorBoard mesh ``landscape/trajectory_3d`` (``mesh=True``; other
    loggers have no mesh view), scalars ``landscape/trajectory_explained_variance_1`` and ``_2`` (the plane shows
    the path honestly only when their sum is high) and ``landscape/trajectory/seconds``. ``last_surface`` holds the
    last plane (:class:`~lightning_landscape.functional.trajectory.TrajectorySurface`; ``LF.save_surface`` exports
    it).

    Distributed: under DDP only rank zero keeps snapshots and runs the PCA; the plane is broadcast and every rank
    evaluates the grid on its probe batches (the loss is their mean over all ranks). A sharded model (FSDP2 through
    ``ModelParallelStrategy``): every rank keeps snapshots of its own local shards under ``<directory>/rank<k>``
    (``max_snapshots`` and the thinning as above, per rank), the Gram matrix is summed across the ranks, so all of
    them get the same coordinates and explained variance and their own rows of the directions, and the grid is
    evaluated with ``θ + x·v_1 + y·v_2`` written into the local shards and restored exactly. No rank gathers the
    full parameter vector; rank zero logs.

    Args:
        every_n_train_steps: draw the plane every ``n`` optimizer steps (or ``every_n_epochs``, or neither:
            ``max_overhead``); it is drawn at the end of the fit in any case.
        every_n_epochs: draw the plane at the end of every ``n``-th epoch.
        snapshot_every_n_train_steps: snapshot every ``n`` optimizer steps (default 1 when neither snapshot
            schedule is given); doubles at each thinning.
        snapshot_every_n_epochs: snapshot at the end of every ``n``-th epoch instead.
        max_snapshots: the most snapshots kept (even, >= 4).
        snapshot_dtype: ``None`` (default) stores the parameters' own dtype (exact); ``"float16"`` or
            ``"bfloat16"`` store ``θ_i − θ_0`` in half precision (half the disk of float32; rounding error at most
            ``2⁻¹¹`` resp. ``2⁻⁸`` of how far each weight has moved since the first snapshot).
        steps: grid points per axis of the plane (>= 3).
        margin: how far the grid extends beyond the path, as a share of the path's span along each axis.
        centered: subtract the mean difference before the PCA (as Li et al.'s code does).
        directory: where the snapshot files go (default ``<trainer.log_dir>/trajectory``).
        mesh: also log the plane as a TensorBoard mesh.
        num_batches: probe batches (or give ``num_samples``).
        num_samples: probe size in samples instead.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default the module's ``training_step``.
        eval_mode: measure in eval mode.
        seed: seed of the callback's generator and of the probe draw.
        strict: raise instead of warning when a measurement fails.
        max_overhead: with neither plane schedule, the share of the fit's wall time this callback may take.

    Example:
        >>> cb = TrajectoryCallback(every_n_epochs=5, snapshot_every_n_epochs=1, snapshot_dtype="float16")
        >>> cb.steps, cb.max_snapshots, cb.snapshot_dtype
        (21, 64, torch.float16)
    """

    prefix = "landscape/trajectory"
    state_key_fields = (
        *MeasurementCallback.state_key_fields,
        "snapshot_every_n_train_steps",
        "snapshot_every_n_epochs",
        "steps",
    )

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        snapshot_every_n_train_steps: int | None = None,
        snapshot_every_n_epochs: int | None = None,
        max_snapshots: int = 64,
        snapshot_dtype: str | torch.dtype | None = None,
        steps: int = 21,
        margin: float = 0.2,
        centered: bool = True,
        directory: str | os.PathLike | None = None,
        mesh: bool = True,
        num_batches: int | None = None,
        num_samples: int | None = None,
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
        seed: int = 0,
        strict: bool = False,
        max_overhead: float | None = None,
    ) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            every_n_epochs=every_n_epochs,
            max_overhead=max_overhead,
            num_batches=num_batches,
            num_samples=num_samples,
            loss_fn=loss_fn,
            eval_mode=eval_mode,
            seed=seed,
            strict=strict,
        )
        check_positive_int("snapshot_every_n_train_steps", snapshot_every_n_train_steps, allow_none=True)
        check_positive_int("snapshot_every_n_epochs", snapshot_every_n_epochs, allow_none=True)
        if snapshot_every_n_train_steps is not None and snapshot_every_n_epochs is not None:
            raise ValueError(
                "Give at most one snapshot schedule: `snapshot_every_n_train_steps` or `snapshot_every_n_epochs` "
                f"(got {snapshot_every_n_train_steps} and {snapshot_every_n_epochs})."
            )
        if (
            isinstance(max_snapshots, bool)
            or not isinstance(max_snapshots, int)
            or max_snapshots < 4
            or max_snapshots % 2
        ):
            raise ValueError(f"`max_snapshots` must be an even integer >= 4, got {max_snapshots!r}.")
        if snapshot_dtype is not None and not any(
            snapshot_dtype in group for group in (SNAPSHOT_DTYPES, SNAPSHOT_DTYPES.values())
        ):
            raise ValueError(
                "`snapshot_dtype` must be None (the parameters' dtype), 'float16' or 'bfloat16', "
                f"got {snapshot_dtype!r}."
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 3:
            raise ValueError(f"`steps` must be an integer >= 3 (grid points per axis), got {steps!r}.")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < float("inf"):
            raise ValueError(f"`margin` must be a finite number >= 0 (a share of the path's span), got {margin!r}.")
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"`directory` must be a path or None, got {directory!r}.")
        check_bool("centered", centered)
        check_bool("mesh", mesh)
        self.snapshot_every_n_train_steps = snapshot_every_n_train_steps
        self.snapshot_every_n_epochs = snapshot_every_n_epochs
        self.max_snapshots = max_snapshots
        self.snapshot_dtype = SNAPSHOT_DTYPES.get(snapshot_dtype, snapshot_dtype)  # type: ignore[arg-type]
        self.steps = steps
        self.margin = float(margin)
        self.centered = centered
        self.directory = None if directory is None else os.fspath(directory)
        self.mesh = mesh
        #: the last plane drawn (every rank), or ``None``
        self.last_surface: TrajectorySurface | None = None
        self.store: SnapshotStore | None = None  # rank zero only (every rank when the model is sharded)
        self._sharded = False  # the module is FSDP2-sharded: every rank keeps its local shards' snapshots
        self._rank = 0
        self._interval = snapshot_every_n_epochs or snapshot_every_n_train_steps or 1
        self._last_snapshot = -1  # step (or epoch) of the last snapshot
        self._retired: list[str] = []  # dropped snapshots' files, deleted once no checkpoint refers to them
        self._pending_store: dict[str, Any] | None = None
        self._pending_layout = (False, 0)  # (sharded, rank) of the checkpoint's store
        self._snap_countdown = [0]
        self._told_disk = False

    # ------------------------------------------------------------------ cost and state
    def work_in_gradients(self) -> float:
        return self.steps**2 / 3.0

    def figures_per_measurement(self) -> int:
        return 1

    def dropped_state_description(self) -> str:
        return super().dropped_state_description() + ", and the snapshots taken so far (the path restarts)"

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        store = self.store.state_dict() if self.store is not None else self._pending_store
        state.update(store=store, interval=self._interval, last_snapshot=self._last_snapshot, retired=self._retired)
        # a sharded run's checkpoint holds rank zero's state (Lightning saves the callbacks' state once): every rank
        # maps its paths to its own directory on resume
        state.update(sharded=self._sharded, rank=self._rank)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._interval = state_dict.get("interval", self._interval)
        self._last_snapshot = state_dict.get("last_snapshot", -1)
        self._pending_store = state_dict.get("store")
        self._pending_layout = (bool(state_dict.get("sharded", False)), int(state_dict.get("rank", 0)))
        self._retired = list(state_dict.get("retired", []))  # deleted at the next checkpoint or thinning
        if self.store is not None and self._pending_store is not None:
            self._restore_store()

    def _restore_store(self, trainer: Trainer | None = None) -> None:
        state, self._pending_store = self._pending_store, None
        sharded, rank = self._pending_layout
        if state is None or self.store is None or not state["paths"]:
            return
        if sharded != self._sharded:
            taken, now = ("sharded", "whole") if sharded else ("whole", "sharded")
            self._retired = []
            self._logger.warn_once(
                "snapshots-layout",
                f"the checkpoint's snapshots hold {taken} parameters and this run's model is {now}; the path restarts "
                "here.",
            )
            return
        if sharded:  # rank zero's state: this rank's files of the same snapshots are in its own directory
            paths = [_rank_path(p, rank, self._rank) for p in state["paths"]]
            state = {**state, "paths": paths, "numel": None}  # the local length: read from this rank's first file
            self._retired = [_rank_path(p, rank, self._rank) for p in self._retired]
        present = [i for i, p in enumerate(state["paths"]) if os.path.exists(p)]
        if sharded and trainer is not None and trainer.world_size > 1:  # every rank keeps the same snapshots
            mask = torch.zeros(len(state["paths"]), dtype=torch.float64, device=trainer.strategy.root_device)
            mask[present] = 1.0
            everywhere = trainer.strategy.reduce(mask, reduce_op="sum").cpu() == trainer.world_size
            present = [i for i in present if everywhere[i]]
        if 0 not in present:
            self._logger.warn_once(
                "snapshots-missing",
                f"the first snapshot file of the checkpoint ({state['paths'][0]}) is gone; the path restarts here.",
            )
            return
        self.store.load_state_dict(state)
        if len(present) < len(state["paths"]):
            self.store.select(present)
            self._logger.warn_once(
                "snapshots-missing",
                f"{len(state['paths']) - len(present)} snapshot file(s) of the checkpoint are gone (deleted after a "
                "later thinning?); the path goes on without them.",
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self._purge()  # this checkpoint refers only to live snapshots

    def _purge(self) -> None:
        for path in self._retired:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        self._retired = []

    # ------------------------------------------------------------------ environment
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        directory = self.directory or os.path.join(log_dir, "trajectory")
        self._snap_countdown = [0]
        self._sharded, self._rank = is_sharded(pl_module), trainer.global_rank
        if self._sharded:  # every rank keeps its own shards' snapshots
            directory = os.path.join(directory, f"rank{self._rank}")
        if not self._keeps_snapshots(trainer):
            return
        if self.store is None:
            self.store = SnapshotStore(directory, dtype=self.snapshot_dtype)
            self._restore_store(trainer)
        self.store.directory = directory  # a resumed run writes its new snapshots beside its own logs
        if len(self.store) == 0:
            self._snapshot(trainer, pl_module, trainer.global_step if self._by_steps else trainer.current_epoch)

    @property
    def _by_steps(self) -> bool:
        return self.snapshot_every_n_epochs is None

    def _keeps_snapshots(self, trainer: Trainer) -> bool:
        """Rank zero keeps the snapshots; every rank its own shards' when the model is sharded."""
        return self._sharded or trainer.is_global_zero

    def _local_weights(self, pl_module: LightningModule) -> torch.Tensor:
        """This rank's rows of the measured parameters of a sharded module, flattened (a copy)."""
        with torch.no_grad():
            return torch.cat([t.reshape(-1) for t in _sharded_layout(pl_module, None)[1]])

    def _snapshot(self, trainer: Trainer, pl_module: LightningModule, when: int) -> None:
        """Write the current weights (rank zero; every rank's local shards when sharded); thin the store when it
        holds too many."""
        store = self.store
        if store is None:
            return
        start = time.perf_counter()
        if self._sharded:
            vector = self._local_weights(pl_module)
            numel, dtype = vector.numel(), vector.dtype
        else:
            spec = ParamSpec(pl_module)
            with torch.no_grad():
                vector = torch.cat([p.reshape(-1) for p in spec.tensors()])
            numel, dtype = spec.numel, spec.dtype
        store.add(vector, step=trainer.global_step)
        self._last_snapshot = when
        seconds = time.perf_counter() - start  # part of what watching costs (the default schedule's budget too)
        if self._budget is not None:
            self._budget.spent += seconds
        else:
            self._fixed_spent += seconds
        if not self._told_disk:
            self._told_disk = True
            each = store.bytes_per_snapshot(numel, dtype)
            files = self.max_snapshots + 1 + (self.max_snapshots + 1) // 2
            total = numel * dtype.itemsize + (files - 1) * each
            whose = f"rank zero's local shards ({numel:,} entries)" if self._sharded else f"{numel:,} parameters"
            message = (
                f"TrajectoryCallback: snapshots of {whose} under {store.directory}, "
                f"{each / 2**20:.2f} MiB each ({store.dtype or dtype}); at most {files} files, "
                f"{total / 2**20:.1f} MiB on disk (over {self.max_snapshots} snapshots every other one is dropped "
                "and the interval doubles)."
            )
            if self._sharded:
                message += " Every rank keeps its own shards' snapshots likewise, beside them under rank<k>."
            rank_zero_info(message)
            self._logger.note(trainer, "landscape/trajectory_disk", message)
        if len(store) > self.max_snapshots:
            self._purge()
            self._retired = store.thin()
            self._interval *= 2
            if not trainer.checkpoint_callbacks:
                self._purge()

    # ------------------------------------------------------------------ schedule
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        countdown = self._snap_countdown
        countdown[0] -= 1
        if countdown[0] <= 0 and self._by_steps:
            step = trainer.global_step
            if step > 0 and step % self._interval == 0 and step != self._last_snapshot:
                if self._keeps_snapshots(trainer):
                    self._snapshot(trainer, pl_module, step)
                self._last_snapshot = step
            countdown[0] = self._interval - step % self._interval
        elif not self._by_steps:
            countdown[0] = 2**62
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not self._by_steps and epoch % self._interval == 0 and epoch != self._last_snapshot:
            if self._keeps_snapshots(trainer):
                self._snapshot(trainer, pl_module, epoch)
            self._last_snapshot = epoch
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        store = self.store
        if store is not None and len(store) and store.steps[-1] != step:
            self._snapshot(trainer, pl_module, self._last_snapshot)  # the final weights end the path
        measured = self._fit_steps and self._fit_steps[-1] == step  # e.g. by every_n_epochs at the last epoch
        if self._probe is not None and step > 0 and step != self._last_step and not measured:
            self._last_step = step
            self._run(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ measuring
    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        count = len(self.store) if self.store is not None else 0
        if trainer.world_size > 1:  # rank zero holds the snapshots: every rank takes its decision
            count = trainer.strategy.broadcast(count, src=0)
        needed = 3 if self.centered else 2
        if count < needed and not trainer.sanity_checking:
            rank_zero_info(
                f"TrajectoryCallback: no plane at step {trainer.global_step}: the PCA needs {needed} snapshots, "
                f"there are {count} so far."
            )
            return
        super()._run(trainer, pl_module)

    def measure(self, trainer: Trainer, pl_module: LightningModule) -> tuple[dict[str, float], dict[str, Figure]]:
        plane, error = None, None
        if self._sharded:  # every rank: its own shards' snapshots, the Gram matrix summed across the ranks
            space, locals_ = _sharded_layout(pl_module, None)
            center = torch.cat([t.detach().reshape(-1) for t in locals_])
            try:
                plane = trajectory_pca(self.store, center, centered=self.centered, space=space)
            except ValueError as err:  # from the summed Gram matrix: the same on every rank
                error = str(err)
        elif trainer.is_global_zero:
            center = ParamSpec(pl_module).parameter_vector()
            try:
                plane = trajectory_pca(self.store, center, centered=self.centered)
            except ValueError as err:
                error = str(err)
        if trainer.world_size > 1 and not self._sharded:  # the plane is rank zero's: every rank evaluates it
            plane, error = trainer.strategy.broadcast((None if plane is None else plane.to("cpu"), error), src=0)
        if error is not None or plane is None:
            raise MeasurementError(error or "no plane")
        surface = trajectory_surface(
            pl_module,
            self.resolved_loss_fn,
            self._probe,
            plane,
            steps=self.steps,
            margin=self.margin,
            eval_mode=self.eval_mode,
            reduce_fn=self.reduce_fn(trainer),
        )
        self.last_surface = surface
        ratio = plane.explained_variance.tolist()
        scalars = {
            "landscape/trajectory_explained_variance_1": ratio[0],
            "landscape/trajectory_explained_variance_2": ratio[1],
        }
        figures: dict[str, Figure] = {}
        if trainer.is_global_zero:
            figures["landscape/trajectory"] = trajectory_figure(
                surface.x, surface.y, surface.losses, plane.coords, plane.steps, plane.explained_variance,
                title=f"Optimizer trajectory, step {trainer.global_step} ({len(plane.steps)} snapshots)",
            )  # fmt: skip
            if self.mesh:  # θ (the origin) marked; to TensorBoard's mesh plugin (the logger skips it elsewhere)
                figures["landscape/trajectory_3d"] = surface_mesh(surface.x, surface.y, surface.losses)
        return scalars, figures


def _rank_path(path: str, saved: int, rank: int) -> str:
    """``path`` under ``.../rank<saved>/`` as the same file under ``.../rank<rank>/`` (another path: unchanged).

    Example:
        >>> _rank_path("/logs/trajectory/rank0/snapshot_00003_step000000012.pt", 0, 1)
        '/logs/trajectory/rank1/snapshot_00003_step000000012.pt'
    """
    folder, name = os.path.split(path)
    parent, leaf = os.path.split(folder)
    if leaf != f"rank{saved}":
        return path
    return os.path.join(parent, f"rank{rank}", name)
