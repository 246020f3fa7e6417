"""The loss operator: loss, gradient and Hessian-vector products over a fixed probe set.

A measurement is ``algorithm(operator)``: Lanczos, Hutch++, the sharpness ascent and the
loss grid only ever call :class:`LossOperator`. The operator evaluates the model at
``θ + δ`` with :func:`torch.func.functional_call` on a dict of tensors, differentiates with
:func:`torch.autograd.grad`, and so never writes the module's weights, buffers or ``.grad``.

The loss over several batches is their sample-weighted mean, so a short last batch counts
for what it holds. Under data parallelism a ``reduce_fn`` (a sum across processes) makes
every quantity the mean over all processes' probe data.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._batches import apply_to_tensors, batch_size, clone_if_inference
from ._params import ParamSpec

__all__ = ["HVP_METHODS", "LossFn", "LossOperator", "MeasurementError", "hvp"]

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Tensor]

#: The Hessian-vector-product methods a caller may ask for. ``"auto"`` tries double
#: backward, then double backward with the math attention backend (for fused attention
#: kernels without double backward), then central finite differences of the gradient; with
#: double backward it sends blocks of several vectors through one batched backward.
HVP_METHODS = (
    "auto",
    "double_backward",
    "double_backward_batched",
    "forward_over_reverse",
    "finite_difference",
)
_AUTO_CHAIN = (("double_backward", False), ("double_backward", True), ("finite_difference", False))


class MeasurementError(RuntimeError):
    """A measurement could not be completed (non-finite values, an op without the needed
    derivative, or a failure on another process)."""


class _OutOfMemory(RuntimeError):
    """Every failing process ran out of memory: retry with fewer vectors at a time."""


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can reparametrize it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


#: the code of every ``@once_differentiable`` wrapper (one function body wraps them all)
_ONCE_DIFFERENTIABLE_CODE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__


def once_differentiable_functions(output: Tensor) -> list[str]:
    """Names of the custom autograd functions marked ``@once_differentiable`` in ``output``'s graph.

    A double backward through one of them runs without an error but treats its backward's result as a
    constant, dropping its part of every Hessian-vector product. Only functions on a path to a tensor
    that requires grad are in the graph, so one applied to the data alone is not reported.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> once_differentiable_functions(torch.nn.functional.softplus(x).sum())
        []
    """
    found: list[str] = []
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)  # set on the nodes of Python autograd functions
        backward = getattr(cls, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE and cls.__name__ not in found:
            found.append(cls.__name__)
        stack.extend(child for child, _ in node.next_functions)
    return found


def _math_attention() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class LossOperator:
    """Loss, gradient and Hessian-vector products of ``loss_fn`` over fixed ``batches``.

    Use it as a context manager: on entry the module is put in eval mode (unless
    ``eval_mode=False``), autocast is switched off and grad enabled (also under
    ``inference_mode``); on exit the module's mode is restored exactly.

    Args:
        model: the module; its weights are never written.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, the mean loss over the batch.
        batches: a sequence of batches (already on the model's device).
        params: the parameters to differentiate (tensors or names); default every
            parameter with ``requires_grad``.
        hvp_method: one of :data:`HVP_METHODS`.
        eval_mode: measure in eval mode (BatchNorm statistics, no dropout). In train mode the
            buffers are evaluated on copies, so running statistics are still never updated.
        reduce_fn: sums a tensor across processes (identity when ``None``); every process
            must call the operator in the same order.
        chunk_size: the most vectors pushed through one batched product (memory bound). On running
            out of memory the chunk is halved and the product retried, down to one vector.
        cache_graph: keep each batch's gradient graph (``create_graph=True``) for the operator's lifetime,
            so a double-backward product costs one backward pass instead of a forward and two backward
            passes (PyHessian does this for one batch). Costs the graphs' memory; dropped on running out
            of memory.
        auto_method: with ``hvp_method="auto"``, the method an earlier operator on the same model chose
            (its :attr:`method`): skips choosing again and keeps ``auto``'s batching of blocks.
        fd_step: relative size of the central finite-difference step (default ``eps^(1/3) / 8`` of the
            dtype, ~6e-4 in float32), scaled by ``(1 + rms(θ)) / rms(v)``. Finite differences see the
            kinks of ReLU-like activations, which the autograd Hessian ignores: on such models they
            measure a different (smoothed) curvature.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()
        >>> batches = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> with LossOperator(model, loss_fn, batches) as op:
        ...     hv = op.hvp(torch.ones(1, op.spec.numel))
        >>> hv.shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Sequence[Tensor | str] | None = None,
        *,
        hvp_method: str = "auto",
        eval_mode: bool = True,
        reduce_fn: ReduceFn | None = None,
        chunk_size: int | None = None,
        fd_step: float | None = None,
        cache_graph: bool = True,
        auto_method: str | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        if hvp_method.split("+")[0] not in HVP_METHODS:
            raise ValueError(f"`hvp_method` must be one of {HVP_METHODS}, got {hvp_method!r}.")
        if auto_method is not None and (hvp_method != "auto" or auto_method.split("+")[0] not in HVP_METHODS[1:]):
            raise ValueError(f"`auto_method` is what `hvp_method='auto'` chose before, got {auto_method!r}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size}.")
        batches = list(batches)
        if not batches:
            raise ValueError("`batches` must hold at least one batch.")
        self.model = model
        self.spec = ParamSpec(model, params)
        with torch.inference_mode(False):  # clones made under inference mode would be inference tensors
            self.batches = [apply_to_tensors(b, clone_if_inference) for b in batches]
        self.reduce_fn = reduce_fn
        self.eval_mode = eval_mode
        self.chunk_size = chunk_size
        self.fd_step = fd_step
        self.cache_graph = cache_graph
        #: products spent choosing the method (``hvp_method="auto"``): one, on the first batch
        self.probe_hvps = 0
        self._graphs: dict[int, tuple[list[Tensor], list[int], list[Tensor]]] = {}
        self.size = self.spec.numel
        self.dtype = self.spec.dtype
        self.device = self.spec.device
        self._wrapper = _LossModule(model, loss_fn)
        self._selected = set(self.spec.names)
        self._local_counts = [batch_size(b) for b in self.batches]
        self._total: float | None = None
        self._mode_stack: list[list[tuple[nn.Module, bool]]] = []
        self._ctx: list[contextlib.ExitStack] = []
        base, _, backend = (auto_method or hvp_method).partition("+")
        self.hvp_method = hvp_method
        self._method: tuple[str, bool] | None = None if base == "auto" else (base, backend == "math_sdpa")
        # with "auto", blocks of vectors go through one batched double backward unless that fails once
        self._auto = hvp_method == "auto"
        self._blocks_batched: bool | None = None

    def parameter_vector(self) -> Tensor:
        """The measured parameters as one flat vector (a copy) in the operator's compute dtype :attr:`dtype`."""
        return self.spec.parameter_vector().to(self.dtype)

    # ------------------------------------------------------------------ context
    def __enter__(self) -> LossOperator:
        modes = [(m, m.training) for m in self.model.modules()]
        self._mode_stack.append(modes)
        if self.eval_mode:
            self.model.eval()
        stack = contextlib.ExitStack()
        # a forward in train mode (dropout) draws from the global RNG: measurements leave it as it was
        device = self.spec.device
        devices = (
            [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
        )
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for device_type in {"cpu", self.spec.device.type}:
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        self._ctx.append(stack)
        return self

    def __exit__(self, *exc: object) -> None:
        self._graphs.clear()
        self._ctx.pop().close()
        for module, training in self._mode_stack.pop():
            module.training = training

    # ------------------------------------------------------------------ reduction
    def _reduce(self, local: Tensor, failure: BaseException | None = None) -> Tensor:
        """Sum ``local`` across processes; if any process failed, raise on all of them.

        Two flags travel with the data: failures, and out-of-memory failures. When every failure
        was out of memory, all processes raise :class:`_OutOfMemory` together, so they can all
        retry with smaller chunks.
        """
        if self.reduce_fn is None:
            if failure is not None and is_out_of_memory(failure):
                raise _OutOfMemory() from failure
            if failure is not None:
                raise failure
            return local
        flags = [0.0 if failure is None else 1.0, 1.0 if failure is not None and is_out_of_memory(failure) else 0.0]
        flag = torch.tensor(flags, dtype=local.dtype, device=local.device)
        packed = self.reduce_fn(torch.cat([local.reshape(-1), flag]))
        failed, oom = packed[-2:].tolist()
        if failed > 0 and failed == oom:
            raise _OutOfMemory() from failure
        if failure is not None or failed > 0:
            raise MeasurementError("the measurement failed on at least one process") from failure
        return packed[:-2].reshape(local.shape)

    def _collective(self, compute: Callable[[], Tensor], shape: Sequence[int]) -> Tensor:
        try:
            local, failure = compute(), None
        except Exception as err:
            if self.reduce_fn is None and not is_out_of_memory(err):
                raise
            local, failure = torch.zeros(shape, dtype=self.spec.dtype, device=self.spec.device), err
        return self._reduce(local, failure)

    @property
    def total_samples(self) -> float:
        """Samples in the probe set, over all processes."""
        if self._total is None:
            local = torch.tensor([float(sum(self._local_counts))], dtype=torch.float64, device=self.spec.device)
            self._total = float(self._reduce(local).item())
        return self._total

    def _weights(self) -> list[float]:
        total = self.total_samples
        return [n / total for n in self._local_counts]

    # ------------------------------------------------------------------ evaluation
    def _param_dict(self, selected: Sequence[Tensor]) -> dict[str, Tensor]:
        """Selected parameters as given, the others detached, buffers copied in train mode."""
        tensors = dict(zip(self.spec.names, selected, strict=False))
        out = {}
        for name, p in self.model.named_parameters():
            out["model." + name] = tensors[name] if name in self._selected else p.detach()
        if not self.eval_mode:
            for name, b in self.model.named_buffers():
                out["model." + name] = b.clone()
        return out

    def _batch_loss(self, selected: Sequence[Tensor], batch: Any) -> Tensor:
        loss = functional_call(self._wrapper, self._param_dict(selected), (batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`loss_fn` must return a scalar tensor, got {shape}.")
        return loss.reshape(())

    def _shifted(self, delta: Tensor | None) -> list[Tensor]:
        base = self.spec.tensors()
        if delta is None:
            return base
        return [b + d.to(b.dtype) for b, d in zip(base, self.spec.split(delta), strict=False)]

    def loss(self, delta: Tensor | None = None) -> Tensor:
        """The loss at ``θ + δ`` (``δ`` a flat vector, or ``None`` for ``θ``), a 0-dim tensor.

        No host synchronisation: the value stays on the device.
        """

        def compute() -> Tensor:
            point = self._shifted(delta)
            with torch.no_grad():
                return sum(
                    w * _at_least_float32(self._batch_loss(point, b))
                    for w, b in zip(self._weights(), self.batches, strict=False)
                )

        return self._collective(compute, ())

    def gradient(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, flat gradient)`` at ``θ + δ``."""
        n = self.spec.numel

        def compute() -> Tensor:
            point = [t.detach().requires_grad_(True) for t in self._shifted(delta)]
            total = torch.zeros(n + 1, dtype=self.spec.dtype, device=self.spec.device)
            for w, b in zip(self._weights(), self.batches, strict=False):
                loss = self._batch_loss(point, b)
                grads = torch.autograd.grad(w * loss, point, allow_unused=True, materialize_grads=True)
                total[:n] += self.spec.flatten(grads).detach()
                total[n] += w * loss.detach()
            return total

        packed = self._collective(compute, (n + 1,))
        return packed[n], packed[:n]

    # ------------------------------------------------------------------ Hessian-vector products
    @property
    def method(self) -> str:
        """The HVP method in use, e.g. ``"double_backward"`` or ``"double_backward+math_sdpa"``
        (``"auto"`` until the first product has been computed)."""
        if self._method is None:
            return "auto"
        name, math_sdpa = self._method
        return name + ("+math_sdpa" if math_sdpa else "")

    def matmat(self, vectors: Tensor) -> Tensor:
        """Alias of :meth:`hvp`: the :class:`SymmetricOperator` interface the algorithms call."""
        return self.hvp(vectors)

    def hvp(self, vectors: Tensor) -> Tensor:
        """Hessian-vector products ``H v`` for each row of ``vectors`` (``[k, numel]`` → ``[k, numel]``)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.spec.numel:
            raise ValueError(f"`vectors` must have shape [k, {self.spec.numel}], got {tuple(vectors.shape)}.")
        vectors = vectors.to(device=self.spec.device, dtype=self.spec.dtype)
        if self._method is None:
            self._method = self._resolve_method(vectors[:1])
        chunk = self.chunk_size or vectors.shape[0]
        while True:
            try:
                return torch.cat([self._block_hvp(c) for c in vectors.split(chunk)])
            except _OutOfMemory:
                if self._graphs:  # first give back the cached gradient graphs
                    self._graphs.clear()
                    self.cache_graph = False
                    continue
                if chunk == 1:
                    raise MeasurementError("out of memory even one vector at a time") from None
                chunk = max(1, chunk // 2)
                self.chunk_size = chunk  # remembered: later products start from the size that fit
                if self.spec.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _block_hvp(self, vectors: Tensor) -> Tensor:
        """Products for one block. Under ``auto`` a block of several vectors goes through one batched double
        backward (``is_grads_batched``: 1.7x to 3x cheaper per vector than a loop in our benchmarks); if that
        fails once, on any process, every later block loops."""
        name, math_sdpa = self._method
        several = vectors.shape[0] > 1 and self._blocks_batched is not False
        if not (self._auto and name == "double_backward" and several):
            return self._collective(lambda: self._local_hvp(vectors, name, math_sdpa), vectors.shape)
        try:
            out = self._collective(
                lambda: self._local_hvp(vectors, "double_backward_batched", math_sdpa), vectors.shape
            )
        except _OutOfMemory:
            raise
        except (RuntimeError, NotImplementedError):
            self._blocks_batched = False
            return self._collective(lambda: self._local_hvp(vectors, name, math_sdpa), vectors.shape)
        self._blocks_batched = True
        return out

    def _resolve_method(self, probe: Tensor) -> tuple[str, bool]:
        """Try the ``auto`` chain on one vector and the first batch; all processes agree."""
        errors = []
        for name, math_sdpa in _AUTO_CHAIN:
            try:
                self.probe_hvps = 1
                hv = self._local_hvp(probe, name, math_sdpa, batches=self.batches[:1])
                failure = None if bool(torch.isfinite(hv).all()) else MeasurementError("non-finite HVP")
            except (RuntimeError, NotImplementedError) as err:
                failure = err
            try:
                self._reduce(torch.zeros(1, dtype=self.spec.dtype, device=self.spec.device), failure)
                return name, math_sdpa
            except (RuntimeError, NotImplementedError, MeasurementError) as err:
                errors.append(f"{name}{'+math_sdpa' if math_sdpa else ''}: {err}")
        raise MeasurementError("no Hessian-vector-product method works for this model: " + "; ".join(errors))

    def _local_hvp(self, vectors: Tensor, name: str, math_sdpa: bool, batches: Sequence[Any] | None = None) -> Tensor:
        cached = batches is None  # the operator's own batches: their gradient graphs may be kept
        weights = self._weights() if cached else [1.0] * len(batches)
        batches = self.batches if cached else batches
        compute = {
            "double_backward": self._hvp_double_backward,
            "double_backward_batched": self._hvp_double_backward,
            "forward_over_reverse": self._hvp_forward_over_reverse,
            "finite_difference": self._hvp_finite_difference,
        }[name]
        with _math_attention() if math_sdpa else contextlib.nullcontext():
            total = torch.zeros_like(vectors)
            for i, (w, b) in enumerate(zip(weights, batches, strict=False)):
                total += compute(vectors, b, batched=name == "double_backward_batched", key=i if cached else None) * w
        return total

    def _gradient_graph(self, batch: Any, key: int | None) -> tuple[list[Tensor], list[int], list[Tensor]]:
        """``(point, live, outputs)``: the gradient at θ with its graph, cached under ``key``."""
        keep = key is not None and self.cache_graph
        if keep and key in self._graphs:
            return self._graphs[key]
        point = [t.detach().requires_grad_(True) for t in self.spec.tensors()]
        loss = self._batch_loss(point, batch)
        once = once_differentiable_functions(loss)
        if once:
            raise MeasurementError(
                f"double backward would silently drop the second derivative through {', '.join(once)} "
                "(marked @once_differentiable); use hvp_method='finite_difference' (or 'auto', which falls back to it)."
            )
        grads = torch.autograd.grad(loss, point, create_graph=True, allow_unused=True, materialize_grads=True)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        graph = (point, live, [grads[i] for i in live])
        if keep:
            self._graphs[key] = graph
        return graph

    def _hvp_double_backward(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: int | None = None
    ) -> Tensor:
        point, live, outputs = self._gradient_graph(batch, key)
        keep = key is not None and self.cache_graph
        out = torch.zeros_like(vectors)
        if not live:  # the gradient does not depend on the parameters: H = 0
            return out
        parts = self.spec.split(vectors)
        if batched:
            hv = torch.autograd.grad(
                outputs,
                point,
                [parts[i] for i in live],
                is_grads_batched=True,
                retain_graph=keep,
                allow_unused=True,
                materialize_grads=True,
            )
            return self.spec.flatten(hv).detach()
        for j in range(vectors.shape[0]):
            hv = torch.autograd.grad(
                outputs,
                point,
                [parts[i][j] for i in live],
                retain_graph=keep or j + 1 < vectors.shape[0],
                allow_unused=True,
                materialize_grads=True,
            )
            out[j] = self.spec.flatten(hv).detach()
        return out

    def _hvp_forward_over_reverse(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: int | None = None
    ) -> Tensor:
        base = tuple(self.spec.tensors())

        def loss_of(*point: Tensor) -> Tensor:
            return self._batch_loss(point, batch)

        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(base))))

        def one(v: Tensor) -> Tensor:
            _, tangent_out = torch.func.jvp(grad_fn, base, tuple(self.spec.split(v)))
            return self.spec.flatten(tangent_out)

        return torch.func.vmap(one)(vectors).detach()

    def _hvp_finite_difference(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: int | None = None
    ) -> Tensor:
        base = self.spec.tensors()
        # an eighth of the textbook eps^(1/3): on the test models truncation, not rounding, dominates
        step_scale = self.fd_step or 0.125 * torch.finfo(self.spec.dtype).eps ** (1 / 3)
        theta_rms = math.sqrt(sum(float(t.pow(2).sum()) for t in base) / self.spec.numel)
        out = torch.zeros_like(vectors)
        for j, v in enumerate(vectors):
            v_rms = float(v.norm()) / math.sqrt(self.spec.numel)
            if v_rms == 0.0:
                continue
            h = step_scale * (1.0 + theta_rms) / v_rms
            grads = []
            for sign in (1.0, -1.0):
                point = [
                    (b + sign * h * d).requires_grad_(True) for b, d in zip(base, self.spec.split(v), strict=False)
                ]
                loss = self._batch_loss(point, batch)
                grads.append(
                    self.spec.flatten(torch.autograd.grad(loss, point, allow_unused=True, materialize_grads=True))
                )
            out[j] = (grads[0] - grads[1]).detach() / (2 * h)
        return out


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    vectors: Tensor,
    params: Sequence[Tensor | str] | None = None,
    *,
    hvp_method: str = "auto",
    eval_mode: bool = True,
) -> Tensor:
    """Hessian-vector products of the probe loss for each row of ``vectors`` (``[k, numel]``).

    The parameter order of the flat vectors is the module's own (``model.named_parameters()``),
    restricted to ``params``.

    Example:
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> hvp(model, loss_fn, [x], torch.eye(2))   # H = XᵀX / n
        tensor([[0.5000, 0.0000],
                [0.0000, 2.0000]])
    """
    with LossOperator(model, loss_fn, batches, params, hvp_method=hvp_method, eval_mode=eval_mode) as op:
        return op.hvp(vectors)


def _at_least_float32(t: Tensor) -> Tensor:
    """Half-precision losses summed in float32; float32 and float64 ones kept as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
