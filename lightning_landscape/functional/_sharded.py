"""The second path of :class:`~lightning_landscape.functional.LossOperator`'s interface: FSDP2-sharded parameters.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, which Lightning's ``ModelParallelStrategy`` applies in
``configure_model``) every parameter is a ``DTensor`` sharded on dim 0 across the data-parallel processes:
each holds a slice of rows, and the module all-gathers them in its own forward. No measurement gathers the
full parameter vector beyond what that forward does:

- **vectors are local shards.** A vector (Lanczos basis, probe, direction, perturbation) is the concatenation
  of this process's rows of every measured parameter, flattened; its inner products and norms reduce across
  the processes (:class:`~lightning_landscape.functional._space.ShardedSpace`, the operator's :attr:`space`),
  so the algorithms run unchanged. Random vectors are the local rows of the same global draw on every process.
- **θ + δ in place.** The loss and gradient at ``θ + δ`` are evaluated by writing ``θ + δ`` into the local
  shards and running the module as in training (FSDP's own unshard/reshard), then restoring every shard by an
  exact copy of ``θ`` (as SAM restores ``w``). One copy of the local shards is kept while the operator is open.
- **gradients by ``backward``** (FSDP reduce-scatters them into the sharded ``.grad``, averaged over the
  processes); the ``.grad`` tensors the optimizer sees are put back afterwards, untouched.
- **Hessian-vector products by central finite differences of gradients** (two gradients each): double
  backward does not run under FSDP. Their error is O(h²) with the step ``h`` below.

Parameters that are not sharded (plain tensors under the same strategy) are held whole by every process:
their gradients are averaged here, and they count once in every inner product.

Example (one process, no sharding needed to show the interface)::

    with ShardedLossOperator(fsdp_model, loss_fn, batches) as op:
        loss, grad = op.gradient()          # grad: this process's rows of every parameter, flattened
        hv = op.hvp(grad[None])             # [1, op.size], local rows of H·g
        op.space.inner(grad[None], hv)      # gᵀHg over all processes
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ._batches import apply_to_tensors, batch_size, clone_if_inference, scalar_loss
from ._operator import EnteredOperator
from ._params import select_parameters

if TYPE_CHECKING:
    from ._space import ShardedSpace, ShardSlice

__all__ = ["ShardedLossOperator", "is_sharded", "local_shard", "reshard", "sharded_parameters"]

LossFn = Callable[[nn.Module, Any], Tensor]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP2 modules or ``DTensor`` parameters (``ModelParallelStrategy``).

    Example:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    dtensor = _dtensor_type()
    if dtensor is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or any(
        isinstance(p, dtensor) for p in model.parameters()
    )


def local_shard(t: Tensor) -> Tensor:
    """A ``DTensor``'s local shard, or a plain tensor's data: a view either way, so writing it writes ``t``.

    Example:
        >>> w = torch.zeros(2)
        >>> local_shard(w).add_(1.0) is not None and w.tolist()
        [1.0, 1.0]
    """
    with torch.no_grad():
        return t.to_local() if hasattr(t, "to_local") else t.data


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (``FSDPModule.reshard``): its registered
    parameters are then the ``DTensor`` shards, and its next forward all-gathers them.

    FSDP2 leaves a module unsharded after a forward that no backward follows (the root module by default, and any
    module with ``reshard_after_forward=False``): its parameters are then plain full tensors, detached from the
    shards. Everything that reads or writes shards calls this first.

    Example:
        >>> reshard(torch.nn.Linear(2, 2))   # no FSDP module: nothing to do
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def sharded_parameters(
    model: nn.Module, params: Sequence[Tensor | str] | None = None
) -> tuple[list[str], list[Tensor], list[ShardSlice], Any, int]:
    """The measured parameters of a sharded ``model``: ``(names, params, slices, group, world_size)``.

    Every ``DTensor`` parameter must be sharded on dim 0 over one one-dimensional mesh (FSDP2 with data
    parallelism only); anything else (tensor parallelism, ``Replicate``/2-D placements) is refused with a
    ``ValueError`` that says so. Plain tensors are taken as replicated.
    """
    from ._space import ShardSlice

    reshard(model)
    dtensor = _dtensor_type()
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    tensors = [named[n] for n in names]
    mesh = None
    for name, p in zip(names, tensors, strict=True):
        if dtensor is None or not isinstance(p, dtensor):
            continue
        placements = tuple(type(pl).__name__ for pl in p.placements)
        shard_dim = getattr(p.placements[0], "dim", None) if len(p.placements) == 1 else None
        if p.device_mesh.ndim != 1 or placements != ("Shard",) or shard_dim != 0:
            raise ValueError(
                f"parameter {name!r} is a DTensor with placements {p.placements} on a {p.device_mesh.ndim}-D mesh: "
                "only FSDP2's data-parallel sharding (Shard(0) on one mesh dimension) can be measured. Tensor "
                "parallelism is not supported: use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)."
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} is sharded over another device mesh than the others.")
    if mesh is None:
        raise ValueError("no parameter of the module is a sharded DTensor: use LossOperator.")
    world, rank = mesh.size(), mesh.get_local_rank()
    slices = []
    for name, p in zip(names, tensors, strict=True):
        if not isinstance(p, dtensor):
            slices.append(ShardSlice(tuple(p.shape), 0, p.shape[0] if p.dim() else 1, replicated=True))
            continue
        rows = p.shape[0]
        chunk = -(-rows // world)  # torch.chunk's sizes, as FSDP2 shards
        start = min(rank * chunk, rows)
        stop = min(start + chunk, rows)
        local = p.to_local()
        if local.shape[0] != stop - start:
            raise ValueError(
                f"parameter {name!r}: this process holds {local.shape[0]} rows, not the {stop - start} of torch.chunk "
                "sharding; uneven custom sharding is not supported."
            )
        slices.append(ShardSlice(tuple(p.shape), start, stop))
    return names, tensors, slices, mesh.get_group(), world


class ShardedLossOperator(EnteredOperator):
    """Loss, gradient and Hessian-vector products of ``loss_fn`` over fixed ``batches`` for an FSDP2-sharded model.

    The same interface as :class:`~lightning_landscape.functional.LossOperator` (``size``, ``dtype``,
    ``device``, ``space``, ``loss``, ``gradient``, ``hvp``/``matmat``, ``parameter_vector``,
    ``rayleigh_by_batch``), so Lanczos, Hutch++, SLQ, the sharpness ascents and the loss grid run on it
    unchanged; vectors hold this process's rows only (see the module docstring for the design). Every process
    must call the operator in the same order (each call runs collectives).

    Args:
        model: the module; its parameters are written in place during a call and restored exactly after it.
        loss_fn: ``loss_fn(model, batch) -> scalar``, the mean loss over the batch.
        batches: this process's probe batches (on its device).
        params: the parameters to measure (tensors or names); default every parameter with ``requires_grad``.
        hvp_method: ``"auto"`` or ``"finite_difference"`` (double backward does not run under FSDP).
        eval_mode: measure in eval mode (BatchNorm statistics, no dropout).
        fd_step: relative finite-difference step (default ``eps^(1/3) / 8`` of the dtype), scaled by
            ``(1 + rms(θ)) / max|v|`` (see :meth:`_step`).
    """

    method = "finite_difference"
    hvp_method = "finite_difference"
    probe_hvps = 0
    check_hvps = 0
    product_check = ""
    product_check_failed = False

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Sequence[Tensor | str] | None = None,
        *,
        hvp_method: str = "auto",
        eval_mode: bool = True,
        fd_step: float | None = None,
        **_: Any,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        if hvp_method.split("+")[0] not in ("auto", "finite_difference"):
            raise ValueError(
                f"`hvp_method` must be 'auto' or 'finite_difference' for a sharded (FSDP2) model: double backward "
                f"does not run under FSDP; got {hvp_method!r}."
            )
        batches = list(batches)
        if not batches:
            raise ValueError("`batches` must hold at least one batch.")
        self.model = model
        self.loss_fn = loss_fn
        self.names, self._params, slices, self.group, self.world_size = sharded_parameters(model, params)
        from ._space import ShardedSpace

        self.space: ShardedSpace = ShardedSpace(slices, group=self.group, world_size=self.world_size)
        self._replicated = [s.replicated for s in slices]
        self._locals = [local_shard(p) for p in self._params]
        self.sizes = [t.numel() for t in self._locals]
        self.size = sum(self.sizes)
        self.dtype = self._locals[0].dtype
        self.device = self._locals[0].device
        with torch.inference_mode(False):
            self.batches = [apply_to_tensors(b, clone_if_inference) for b in batches]
        self._counts = [batch_size(b) for b in self.batches]
        self.eval_mode = eval_mode
        self.fd_step = fd_step
        self._theta_rms: float | None = None
        self._theta: list[Tensor] | None = None
        self._total: float | None = None
        self._ctx: list[contextlib.ExitStack] = []
        self._saved_modes: list[list[tuple[nn.Module, bool]]] = []

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ShardedLossOperator:
        self._check_batch_counts()  # before any state changes: a raise here needs no __exit__
        self._saved_modes.append([(m, m.training) for m in self.model.modules()])
        if self.eval_mode:
            self.model.eval()
        stack = contextlib.ExitStack()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.inference_mode(False))
        for device_type in {"cpu", self.device.type}:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        self._ctx.append(stack)
        self._theta = [t.detach().clone() for t in self._locals]  # the exact weights, restored after each call
        return self

    def _check_batch_counts(self) -> None:
        """Every process must hold as many probe batches (the per-batch products run collectives batch by batch):
        raise the same ``ValueError`` on all of them otherwise."""
        counts = torch.tensor([len(self.batches), -len(self.batches)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX, group=self.group)
        most, fewest = int(counts[0]), -int(counts[1])
        if most != fewest:
            raise ValueError(
                f"the processes hold different numbers of probe batches ({fewest} to {most}); a sharded measurement "
                "needs the same number on every process (e.g. a DistributedSampler with drop_last, num_batches=)."
            )

    def __exit__(self, *exc: object) -> None:
        self._restore()
        self._theta = None
        self._ctx.pop().close()
        for module, training in self._saved_modes.pop():
            module.training = training

    # ------------------------------------------------------------------ vectors
    def split(self, flat: Tensor) -> list[Tensor]:
        """A local flat vector ``[..., size]`` as per-parameter local shards ``[..., *local shape]``."""
        lead = flat.shape[:-1]
        return [p.reshape(*lead, *t.shape) for p, t in zip(flat.split(self.sizes, dim=-1), self._locals, strict=True)]

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def parameter_vector(self) -> Tensor:
        """This process's rows of the measured parameters, flattened (a copy)."""
        return self.flatten([t.detach() for t in self._locals]).clone()

    def base_tensors(self) -> list[Tensor]:
        """The local shards' current values (views)."""
        return [t.detach() for t in self._locals]

    @property
    def total_samples(self) -> float:
        """Samples in the probe set, over all processes."""
        if self._total is None:
            local = torch.tensor([float(sum(self._counts))], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(local, group=self.group)
            self._total = float(local.item())
        return self._total

    # ------------------------------------------------------------------ evaluation at θ + δ
    def _write(self, delta: Tensor | None) -> None:
        if self._theta is None:
            raise RuntimeError("use the operator as a context manager: `with ShardedLossOperator(...) as op:`")
        reshard(self.model)  # a module left unsharded would not see the shards' new values
        with torch.no_grad():
            if delta is None:
                for t, theta in zip(self._locals, self._theta, strict=True):
                    t.copy_(theta)
                return
            for t, theta, d in zip(self._locals, self._theta, self.split(delta.to(self.dtype)), strict=True):
                torch.add(theta, d, out=t)

    def _restore(self) -> None:
        if self._theta is not None:
            # FSDP2 keeps a module unsharded after a forward without backward (the root by default): free that
            # copy of θ + δ first, so the next forward (training's) gathers the restored shards
            reshard(self.model)
            with torch.no_grad():
                for t, theta in zip(self._locals, self._theta, strict=True):
                    t.copy_(theta)

    def _loss_of(self, batch: Any) -> Tensor:
        return scalar_loss(self.loss_fn(self.model, batch))

    def loss(self, delta: Tensor | None = None) -> Tensor:
        """The loss at ``θ + δ`` over every process's probe (``δ`` a local flat vector), a 0-dim tensor."""
        self._require_open()
        total = self.total_samples
        try:
            self._write(delta)
            with torch.no_grad():
                local = sum(
                    n * self._loss_of(b).to(torch.float64) for n, b in zip(self._counts, self.batches, strict=True)
                )
        finally:
            self._restore()
        local = torch.as_tensor(local, dtype=torch.float64, device=self.device).reshape(1)
        torch.distributed.all_reduce(local, group=self.group)
        return (local[0] / total).to(self.dtype)

    def _gradient(self, delta: Tensor | None, batches: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(loss, local flat gradient)`` at ``θ + δ`` of the sample-weighted loss over probe batches ``batches``
        (indices, the same on every process), averaged over the processes' samples."""
        self._require_open()
        counts = torch.tensor([float(sum(self._counts[i] for i in batches))], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(counts, group=self.group)
        total = float(counts.item())
        reshard(self.model)  # the registered parameters are then the shards whose `.grad` the optimizer reads
        everything = list(self.model.parameters())
        saved_grads = [p.grad for p in everything]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        try:
            for p in everything:
                p.grad = None
            self._write(delta)
            with torch.enable_grad():
                for i in batches:
                    loss = self._loss_of(self.batches[i])
                    # FSDP averages the sharded gradients over the processes: scale so the average is of the whole
                    (loss * (self._counts[i] * self.world_size / total)).backward()
                    loss_sum += self._counts[i] * loss.detach().to(torch.float64)
            grads = []
            for p, replicated in zip(self._params, self._replicated, strict=True):
                g = p.grad
                g = torch.zeros_like(local_shard(p)) if g is None else local_shard(g)
                if replicated:  # not reduced by FSDP: average here
                    g = g.clone()
                    torch.distributed.all_reduce(g, group=self.group)
                    g = g / self.world_size
                grads.append(g.detach().to(self.dtype))
            flat = self.flatten(grads)
        finally:
            for p, g in zip(everything, saved_grads, strict=True):
                p.grad = g
            self._restore()
        loss_sum = loss_sum.reshape(1)
        torch.distributed.all_reduce(loss_sum, group=self.group)
        return (loss_sum[0] / total).to(self.dtype), flat

    def gradient(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, local flat gradient)`` at ``θ + δ``."""
        return self._gradient(delta, range(len(self.batches)))

    # ------------------------------------------------------------------ Hessian-vector products
    def _step(self, v: Tensor) -> float:
        """The central-difference step ``h`` for direction ``v``: ``fd_step · (1 + rms θ) / max|v|``, so that no
        coordinate moves by more than ``fd_step · (1 + rms θ)``. Scaling by ``max|v|`` rather than ``rms v``
        matters for directions concentrated on few coordinates (a transformer's top eigenvector sits on a few
        hundred residual-stream entries): there an rms-scaled step moved those entries by O(1) and the product
        along the top eigenvector was 83% off in float32, against 0.55% with this step."""
        scale = self.fd_step or 0.125 * torch.finfo(self.dtype).eps ** (1 / 3)
        if self._theta_rms is None:
            count = self.space.dimension(self.size)
            self._theta_rms = float(self.space.norm(self.parameter_vector())) / math.sqrt(count)
        v_max = float(self.space.max_abs(v))
        return 0.0 if v_max == 0.0 else scale * (1.0 + self._theta_rms) / v_max

    def _fd_product(self, v: Tensor, batches: Sequence[int]) -> Tensor:
        h = self._step(v)
        if h == 0.0:
            return torch.zeros_like(v)
        _, plus = self._gradient(h * v, batches)
        _, minus = self._gradient(-h * v, batches)
        return (plus - minus) / (2 * h)

    def matmat(self, vectors: Tensor) -> Tensor:
        """Alias of :meth:`hvp` (the interface the algorithms call)."""
        return self.hvp(vectors)

    def hvp(self, vectors: Tensor) -> Tensor:
        """``H v`` (local rows) for each row of ``vectors [k, size]``: two gradients per vector."""
        if vectors.dim() != 2 or vectors.shape[1] != self.size:
            raise ValueError(f"`vectors` must have shape [k, {self.size}], got {tuple(vectors.shape)}.")
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        every = range(len(self.batches))
        return torch.stack([self._fd_product(v, every) for v in vectors])

    def rayleigh_by_batch(self, vector: Tensor) -> tuple[float, float, int]:
        """``(mean, spread, batches)`` of the per-batch quotients ``vᵀH_b v / vᵀv`` (batch ``b`` of every process
        together), sample-weighted; two gradients per probe batch. See :meth:`LossOperator.rayleigh_by_batch`."""
        v = vector.reshape(-1).to(device=self.device, dtype=self.dtype)
        norm2 = float(self.space.total(v * v))
        stats = []
        for i in range(len(self.batches)):
            hv = self._fd_product(v, [i])
            q = float(self.space.total(hv * v)) / norm2
            n = torch.tensor([float(self._counts[i])], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(n, group=self.group)
            stats.append((q, float(n.item())))
        samples = sum(n for _, n in stats)
        mean = sum(q * n for q, n in stats) / samples
        spread = math.sqrt(max(sum(q * q * n for q, n in stats) / samples - mean * mean, 0.0))
        return mean, spread, len(stats)

    def check_substitution(self) -> None:
        """Nothing to check: the sharded path writes the parameters themselves, so every read sees ``θ + δ``."""
