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
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._batches import apply_to_tensors, batch_size, clone_if_inference, split_batch
from ._params import ParamSpec, compute_dtype

__all__ = ["HVP_METHODS", "LossFn", "LossOperator", "MeasurementError", "hvp", "leaked_parameters"]

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
    """Every failing process ran out of memory: retry with fewer vectors (or samples) at a time.

    Carries the allocator's message, so that a final failure still says what ran out and where."""


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


def _graph_nodes(output: Tensor) -> Iterator[Any]:
    """Every autograd node on a path from ``output`` back to its leaves, each once."""
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(child for child, _ in node.next_functions)


def leaked_parameters(output: Tensor, model: nn.Module) -> list[str]:
    """Names of ``model``'s own parameters that are leaves of ``output``'s graph.

    Under :func:`torch.func.functional_call` every parameter the loss reads through the module's attributes is
    replaced by the tensor given for it; a parameter that still shows up as a leaf was read another way (a
    Python list built in ``__init__``, a cached attribute), so perturbing and differentiating "the parameters"
    would miss it and measure a different function.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> substituted = {"weight": torch.ones(1, 2, requires_grad=True), "bias": net.bias}   # bias: the module's own
        >>> leaked_parameters(functional_call(net, substituted, (torch.ones(2),)).sum(), net)
        ['bias']
    """
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    found: list[str] = []
    for node in _graph_nodes(output):
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in names and names[id(variable)] not in found:
            found.append(names[id(variable)])
    return found


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
    for node in _graph_nodes(output):
        cls = getattr(node, "_forward_cls", None)  # set on the nodes of Python autograd functions
        backward = getattr(cls, "backward", None)
        if getattr(backward, "__code__", None) is _ONCE_DIFFERENTIABLE_CODE and cls.__name__ not in found:
            found.append(cls.__name__)
    return found


def _math_attention() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class LossOperator:
    """Loss, gradient and Hessian-vector products of ``loss_fn`` over fixed ``batches``.

    Use it as a context manager: on entry the module is put in eval mode (unless
    ``eval_mode=False``), autocast is switched off and grad enabled (also under
    ``inference_mode``), sparse embeddings give dense gradients; on exit all of that is restored exactly.

    Checks that keep a number from being silently wrong (each once per operator):

    - **substitution**: the first graph built (or, before a loss-only evaluation, one forward pass on the first
      batch) is searched for the module's own parameters as leaves: a loss that reads a parameter through a
      Python list or a cached attribute bypasses ``functional_call``, and is refused with
      :class:`MeasurementError` naming the parameter;
    - **the exact product** (``validate=True``): at the first product, ``u·Hv = v·Hu`` for two random vectors and
      ``Hv`` against central finite differences of true gradients at two step sizes (the comparison counts only
      where the two finite differences agree with each other, so the kinks of ReLU networks cannot trigger it).
      Some PyTorch ops' double backward runs without an error and gives a wrong product
      (``parametrizations.weight_norm`` is one). Under ``auto`` a failed check switches to finite differences;
      an explicitly chosen method that fails it warns once. :attr:`product_check` says what was found.

    Half-precision parameters (``bfloat16``/``float16``, as under ``bf16-true``/``16-true`` training) are measured
    in float32: the operator substitutes float32 copies of the parameters, buffers and floating inputs, so
    :attr:`dtype` is float32 and results agree with a float32 model holding the same weights.

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
            out of memory the chunk is halved and the product retried, down to one vector; then the probe
            batches are split into halves, quarters, … (losses and gradients do the same).
        cache_graph: keep each batch's gradient graph (``create_graph=True``) for the operator's lifetime,
            so a double-backward product costs one backward pass instead of a forward and two backward
            passes (PyHessian does this for one batch). Costs the graphs' memory; dropped on running out
            of memory.
        auto_method: with ``hvp_method="auto"``, the method an earlier operator on the same model chose
            (its :attr:`method`): skips choosing (and checking) again and keeps ``auto``'s batching of blocks.
        fd_step: relative size of the central finite-difference step (default ``eps^(1/3) / 8`` of the
            dtype, ~6e-4 in float32), scaled by ``(1 + rms(θ)) / rms(v)``. Finite differences see the
            kinks of ReLU-like activations, which the autograd Hessian ignores: on such models they
            measure a different (smoothed) curvature.
        validate: check the exact product once, at the first product (see above). Callers that already
            checked the same model and method (the callbacks, after their first measurement) pass ``False``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()
        >>> batches = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> with LossOperator(model, loss_fn, batches) as op:
        ...     hv = op.hvp(torch.ones(1, op.spec.numel))
        >>> hv.shape, op.product_check.startswith("passed")
        (torch.Size([1, 4]), True)
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
        validate: bool = True,
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
        #: the dtype every quantity is computed in: the parameters', but float32 for half-precision parameters
        self.dtype = compute_dtype(self.spec.dtype)
        self._upcast = self.dtype != self.spec.dtype
        with torch.inference_mode(False):  # clones made under inference mode would be inference tensors
            self.batches = [apply_to_tensors(b, self._input) for b in batches]
        self.reduce_fn = reduce_fn
        self.eval_mode = eval_mode
        self.chunk_size = chunk_size
        self.fd_step = fd_step
        self.cache_graph = cache_graph
        #: products spent choosing the method (``hvp_method="auto"``): one, on the first batch
        self.probe_hvps = 0
        #: product-equivalents spent checking the exact product (``validate``): about four, once
        self.check_hvps = 0
        #: what the exact-product check found ("" until it ran, or when ``validate=False``)
        self.product_check = ""
        #: whether that check failed (the chosen exact method disagreed with finite differences or itself)
        self.product_check_failed = False
        self._validate = validate
        self._graphs: dict[tuple[int, int], tuple[list[Tensor], list[int], list[Tensor]]] = {}
        self.size = self.spec.numel
        self.device = self.spec.device
        self._wrapper = _LossModule(model, loss_fn)
        self._selected = set(self.spec.names)
        self._local_counts = [batch_size(b) for b in self.batches]
        self._total: float | None = None
        self._pieces = 1  # each probe batch is evaluated in this many parts (grows on running out of memory)
        self._substitution_checked = False
        self._saved: list[tuple[list[tuple[nn.Module, bool]], list[tuple[nn.Module, bool]]]] = []
        self._ctx: list[contextlib.ExitStack] = []
        base, _, backend = (auto_method or hvp_method).partition("+")
        self.hvp_method = hvp_method
        self._method: tuple[str, bool] | None = None if base == "auto" else (base, backend == "math_sdpa")
        if auto_method is not None:
            self._validate = False  # an earlier operator chose (and checked) it
        # with "auto", blocks of vectors go through one batched double backward unless that fails once
        self._auto = hvp_method == "auto"
        self._blocks_batched: bool | None = None

    def _input(self, t: Tensor) -> Tensor:
        t = clone_if_inference(t)
        return t.to(self.dtype) if self._upcast and t.is_floating_point() else t

    def parameter_vector(self) -> Tensor:
        """The measured parameters as one flat vector (a copy) in the operator's compute dtype :attr:`dtype`."""
        return self.spec.parameter_vector().to(self.dtype)

    def base_tensors(self) -> list[Tensor]:
        """The measured parameters' current values in :attr:`dtype` (views, or float32 copies of half ones)."""
        base = self.spec.tensors()
        return [t.to(self.dtype) for t in base] if self._upcast else base

    # ------------------------------------------------------------------ context
    def __enter__(self) -> LossOperator:
        modes = [(m, m.training) for m in self.model.modules()]
        sparse = [(m, m.sparse) for m in self.model.modules() if getattr(m, "sparse", False) is True]
        self._saved.append((modes, sparse))
        if self.eval_mode:
            self.model.eval()
        for m, _ in sparse:  # nn.Embedding(sparse=True): dense gradients within the measurement
            m.sparse = False
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
        modes, sparse = self._saved.pop()
        for module, training in modes:
            module.training = training
        for module, value in sparse:
            module.sparse = value

    # ------------------------------------------------------------------ reduction
    def _reduce(self, local: Tensor, failure: BaseException | None = None) -> Tensor:
        """Sum ``local`` across processes; if any process failed, raise on all of them.

        Two flags travel with the data: failures, and out-of-memory failures. When every failure
        was out of memory, all processes raise :class:`_OutOfMemory` together, so they can all
        retry with smaller chunks.
        """
        if self.reduce_fn is None:
            if failure is not None and is_out_of_memory(failure):
                raise _OutOfMemory(_message(failure)) from failure
            if failure is not None:
                raise failure
            return local
        flags = [0.0 if failure is None else 1.0, 1.0 if failure is not None and is_out_of_memory(failure) else 0.0]
        flag = torch.tensor(flags, dtype=local.dtype, device=local.device)
        packed = self.reduce_fn(torch.cat([local.reshape(-1), flag]))
        failed, oom = packed[-2:].tolist()
        if failed > 0 and failed == oom:
            raise _OutOfMemory(_message(failure) if failure is not None else "out of memory on another process")
        if failure is not None or failed > 0:
            reason = f": {type(failure).__name__}: {failure}" if failure is not None else ""
            raise MeasurementError(f"the measurement failed on at least one process{reason}") from failure
        return packed[:-2].reshape(local.shape)

    def _collective(self, compute: Callable[[], Tensor], shape: Sequence[int]) -> Tensor:
        try:
            local, failure = compute(), None
        except Exception as err:
            if self.reduce_fn is None and not is_out_of_memory(err):
                raise
            local, failure = torch.zeros(shape, dtype=self.dtype, device=self.spec.device), err
        return self._reduce(local, failure)

    def _split_on_oom(self, compute: Callable[[], Tensor], shape: Sequence[int]) -> Tensor:
        """``_collective(compute)``, retried with the probe batches split in twice as many parts on running out
        of memory (every process together), until one sample at a time."""
        while True:
            try:
                return self._collective(compute, shape)
            except _OutOfMemory as err:
                self._more_pieces(err)

    def _more_pieces(self, err: _OutOfMemory) -> None:
        if self._pieces >= max(self._local_counts):
            raise MeasurementError(
                f"out of memory even with the probe batches split into single samples ({err})"
            ) from None
        self._pieces *= 2
        self._graphs.clear()
        if self.spec.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def total_samples(self) -> float:
        """Samples in the probe set, over all processes."""
        if self._total is None:
            local = torch.tensor([float(sum(self._local_counts))], dtype=torch.float64, device=self.spec.device)
            self._total = float(self._reduce(local).item())
        return self._total

    def _parts(self, batches: Sequence[Any] | None = None) -> list[tuple[float, Any]]:
        """``(weight, part)`` for every part of every probe batch (``batches``: others, weighted equally)."""
        if batches is not None:
            return [(1.0 / len(batches), b) for b in batches]
        total = self.total_samples
        out = []
        for b in self.batches:
            for part in split_batch(b, self._pieces) if self._pieces > 1 else [b]:
                out.append((batch_size(part) / total, part))
        return out

    # ------------------------------------------------------------------ evaluation
    def _param_dict(self, selected: Sequence[Tensor]) -> dict[str, Tensor]:
        """Selected parameters as given, the others detached, buffers copied in train mode (cast when upcasting)."""
        tensors = dict(zip(self.spec.names, selected, strict=False))
        out = {}
        for name, p in self.model.named_parameters():
            out["model." + name] = tensors[name] if name in self._selected else self._input(p.detach())
        if not self.eval_mode or self._upcast:  # train mode updates buffers in place: give it copies
            for name, b in self.model.named_buffers():
                t = b.detach()
                if self._upcast and t.is_floating_point():
                    t = t.to(self.dtype)
                elif not self.eval_mode:
                    t = t.clone()
                out["model." + name] = t
        return out

    def _batch_loss(self, selected: Sequence[Tensor], batch: Any) -> Tensor:
        loss = functional_call(self._wrapper, self._param_dict(selected), (batch,))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`loss_fn` must return a scalar tensor, got {shape}.")
        return loss.reshape(())

    def _check_graph(self, loss: Tensor) -> None:
        """Refuse a loss that reads the module's parameters around ``functional_call`` (once per operator)."""
        if self._substitution_checked:
            return
        leaked = leaked_parameters(loss, self.model)
        self._substitution_checked = True
        if leaked:
            self._substitution_checked = False
            raise MeasurementError(
                f"the loss reads the parameter(s) {', '.join(leaked)} without going through the module's attributes "
                "(e.g. a Python list or a cached attribute built in __init__), so they cannot be perturbed or "
                "differentiated: every measurement would be of another function. Read them as module attributes "
                "inside forward/training_step (e.g. `[self.a.weight, ...]` built there, or `self.parameters()`)."
            )

    def check_substitution(self) -> None:
        """Run the substitution check now (one forward pass with grad on the first probe batch), if not yet run."""
        if self._substitution_checked:
            return
        first, pieces = self.batches[0], self._pieces
        while True:  # on running out of memory, on a half of the batch, a quarter, ...
            try:
                part = split_batch(first, pieces)[0] if pieces > 1 else first
                point = [t.detach().requires_grad_(True) for t in self.base_tensors()]
                self._check_graph(self._batch_loss(point, part))
                return
            except Exception as err:
                if not is_out_of_memory(err) or pieces >= batch_size(first):
                    raise
                pieces *= 2

    def _shifted(self, delta: Tensor | None) -> list[Tensor]:
        base = self.base_tensors()
        if delta is None:
            return base
        return [b + d.to(b.dtype) for b, d in zip(base, self.spec.split(delta), strict=False)]

    def loss(self, delta: Tensor | None = None) -> Tensor:
        """The loss at ``θ + δ`` (``δ`` a flat vector, or ``None`` for ``θ``), a 0-dim tensor.

        No host synchronisation: the value stays on the device.
        """
        if not self._substitution_checked:
            self._split_on_oom(lambda: (self.check_substitution(), torch.zeros((), dtype=self.dtype))[1], ())

        def compute() -> Tensor:
            point = self._shifted(delta)
            with torch.no_grad():
                return sum(w * _at_least_float32(self._batch_loss(point, b)) for w, b in self._parts())

        return self._split_on_oom(compute, ())

    def gradient(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, flat gradient)`` at ``θ + δ``."""
        n = self.spec.numel

        def compute() -> Tensor:
            point = [t.detach().requires_grad_(True) for t in self._shifted(delta)]
            total = torch.zeros(n + 1, dtype=self.dtype, device=self.spec.device)
            for w, b in self._parts():
                loss = self._batch_loss(point, b)
                self._check_graph(loss)
                grads = torch.autograd.grad(w * loss, point, allow_unused=True, materialize_grads=True)
                total[:n] += self.spec.flatten(grads).detach()
                total[n] += w * loss.detach()
            return total

        packed = self._split_on_oom(compute, (n + 1,))
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
        vectors = vectors.to(device=self.spec.device, dtype=self.dtype)
        if self._method is None:
            self._method = self._resolve_method(vectors[:1])
        if self._validate:
            self._validate = False
            self._check_product()
        chunk = self.chunk_size or vectors.shape[0]
        while True:
            try:
                return torch.cat([self._block_hvp(c) for c in vectors.split(chunk)])
            except _OutOfMemory as err:
                if self._graphs:  # first give back the cached gradient graphs
                    self._graphs.clear()
                    self.cache_graph = False
                    continue
                if chunk == 1:  # then split the probe batches
                    try:
                        self._more_pieces(err)
                    except MeasurementError as final:
                        raise MeasurementError(f"out of memory even one vector at a time: {final}") from None
                    continue
                chunk = max(1, chunk // 2)
                self.chunk_size = chunk  # remembered: later products start from the size that fit
                if self.spec.device.type == "cuda":
                    torch.cuda.empty_cache()

    def rayleigh_by_batch(self, vector: Tensor) -> tuple[float, float, int]:
        """How much ``vᵀHv`` depends on the probe: ``(mean, spread, batches)`` of the per-batch quotients
        ``vᵀH_b v / vᵀv`` over every probe batch of every process, sample-weighted (``spread`` is their weighted
        standard deviation). The mean is ``vᵀHv / vᵀv`` itself; ``spread / sqrt(batches)`` is the standard error
        of that number from the probe's sampling. Costs one product in all (each batch's, on its kept graph).

        Example:
            >>> model = torch.nn.Linear(1, 1, bias=False)
            >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()           # H_b = mean of x² over batch b
            >>> with LossOperator(model, loss_fn, [torch.tensor([[1.0]]), torch.tensor([[3.0]])]) as op:
            ...     op.rayleigh_by_batch(torch.ones(1))
            (5.0, 4.0, 2)
        """
        v = vector.reshape(1, -1).to(device=self.spec.device, dtype=self.dtype)
        if self._method is None:
            self.hvp(v)  # chooses (and checks) the method
        name, math_sdpa = self._method
        compute = self._product(name)
        norm2 = (v * v).sum()

        def local() -> Tensor:
            stats = torch.zeros(4, dtype=torch.float64, device=self.spec.device)
            with _math_attention() if math_sdpa else contextlib.nullcontext():
                for i, (_, b) in enumerate(self._parts()):
                    n = float(batch_size(b))
                    q = ((compute(v, b, key=(i, self._pieces))[0] * v[0]).sum() / norm2).double()
                    stats += torch.stack([q * n, q * q * n, q.new_tensor(n), q.new_tensor(1.0)])
            return stats

        total, total_sq, samples, batches = (float(x) for x in self._collective(local, (4,)))
        mean = total / samples
        return mean, math.sqrt(max(total_sq / samples - mean * mean, 0.0)), round(batches)

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
        first = self._parts()[:1]
        for name, math_sdpa in _AUTO_CHAIN:
            try:
                self.probe_hvps = 1
                hv = self._local_hvp(probe, name, math_sdpa, batches=[b for _, b in first])
                failure = None if bool(torch.isfinite(hv).all()) else MeasurementError("non-finite HVP")
            except (RuntimeError, NotImplementedError) as err:
                failure = err
            try:
                self._reduce(torch.zeros(1, dtype=self.dtype, device=self.spec.device), failure)
                return name, math_sdpa
            except (RuntimeError, NotImplementedError, MeasurementError) as err:
                errors.append(f"{name}{'+math_sdpa' if math_sdpa else ''}: {type(err).__name__}: {_message(err)}")
        raise MeasurementError("no Hessian-vector-product method works for this model: " + "; ".join(errors))

    def _check_product(self) -> None:
        """Check the exact product once (symmetry, and finite differences where they are reliable); see the class
        docstring. Under ``auto`` a failure switches to finite differences; otherwise it warns."""
        name, math_sdpa = self._method
        if name == "finite_difference":
            return
        first = [b for _, b in self._parts()[:1]]
        gen = torch.Generator().manual_seed(0)
        uv = torch.randn(2, self.spec.numel, generator=gen, dtype=self.dtype).to(self.spec.device)
        uv = uv / uv.norm(dim=1, keepdim=True)
        eps = torch.finfo(self.dtype).eps
        step = self.fd_step or 0.125 * eps ** (1 / 3)

        def local() -> Tensor:
            exact = self._local_hvp(uv, name, math_sdpa, batches=first)
            fd = self._local_hvp(uv[1:], "finite_difference", False, batches=first, fd_step=step)
            fd2 = self._local_hvp(uv[1:], "finite_difference", False, batches=first, fd_step=2 * step)
            u, v = uv
            hu, hv = exact
            asym = (u @ hv - v @ hu).abs() / (hv.norm() + hu.norm()).clamp_min(torch.finfo(self.dtype).tiny)
            scale = fd[0].norm().clamp_min(torch.finfo(self.dtype).tiny)
            return torch.stack([asym, (hv - fd[0]).norm() / scale, (fd2[0] - fd[0]).norm() / scale])

        try:
            # a maximum across processes, through the sum: every process decides alike
            found = self._collective(local, (3,))
        except _OutOfMemory:  # the check does not fit beside the measurement: nothing to learn, go on without it
            self.product_check = "not run (out of memory)"
            return
        self.check_hvps = 4  # two exact products and four gradients, about four products
        asym, err, spread = (float(x) for x in found)
        sym_tol = 1000 * eps
        fd_tol = max(10 * spread, 1e3 * eps ** (1 / 2))
        fd_says = spread < 0.1 and err > fd_tol  # finite differences are smooth here, and disagree
        figures = f"asymmetry {asym:.1e} (tolerance {sym_tol:.0e}), difference from finite differences {err:.1e}"
        figures += f" (their own spread {spread:.1e})"
        if asym <= sym_tol and not fd_says:
            self.product_check = f"passed: {figures}"
            return
        self.product_check_failed = True
        if self._auto:
            self._method = ("finite_difference", False)
            self.product_check = (
                f"{_method_name(name, math_sdpa)} failed the check ({figures}); now finite_difference"
            )
        else:
            self.product_check = f"{_method_name(name, math_sdpa)} failed the check ({figures})"
            warnings.warn(
                f"hvp_method={name!r} gives a wrong Hessian-vector product for this model: {figures}. Some PyTorch "
                "ops' double backward is wrong without an error (e.g. parametrizations.weight_norm); use "
                "hvp_method='auto' or 'finite_difference'.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _local_hvp(
        self,
        vectors: Tensor,
        name: str,
        math_sdpa: bool,
        batches: Sequence[Any] | None = None,
        fd_step: float | None = None,
    ) -> Tensor:
        cached = batches is None  # the operator's own batches: their gradient graphs may be kept
        parts = self._parts(batches)
        compute = self._product(name)
        with _math_attention() if math_sdpa else contextlib.nullcontext():
            total = torch.zeros_like(vectors)
            for i, (w, b) in enumerate(parts):
                key = (i, self._pieces) if cached else None
                out = compute(vectors, b, batched=name == "double_backward_batched", key=key, fd_step=fd_step)
                total += out * w
        return total

    def _product(self, name: str) -> Callable[..., Tensor]:
        """The per-batch product function of method ``name`` (see :data:`HVP_METHODS`)."""
        return {
            "double_backward": self._hvp_double_backward,
            "double_backward_batched": self._hvp_double_backward,
            "forward_over_reverse": self._hvp_forward_over_reverse,
            "finite_difference": self._hvp_finite_difference,
        }[name]

    def _gradient_graph(self, batch: Any, key: Any) -> tuple[list[Tensor], list[int], list[Tensor]]:
        """``(point, live, outputs)``: the gradient at θ with its graph, cached under ``key``."""
        keep = key is not None and self.cache_graph
        if keep and key in self._graphs:
            return self._graphs[key]
        point = [t.detach().requires_grad_(True) for t in self.base_tensors()]
        loss = self._batch_loss(point, batch)
        self._check_graph(loss)
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
        self, vectors: Tensor, batch: Any, batched: bool = False, key: Any = None, fd_step: float | None = None
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
        self, vectors: Tensor, batch: Any, batched: bool = False, key: Any = None, fd_step: float | None = None
    ) -> Tensor:
        base = tuple(self.base_tensors())
        if not self._substitution_checked:
            self._check_graph(self._batch_loss([t.detach().requires_grad_(True) for t in base], batch))

        def loss_of(*point: Tensor) -> Tensor:
            return self._batch_loss(point, batch)

        grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(base))))

        def one(v: Tensor) -> Tensor:
            _, tangent_out = torch.func.jvp(grad_fn, base, tuple(self.spec.split(v)))
            return self.spec.flatten(tangent_out)

        return torch.func.vmap(one)(vectors).detach()

    def _hvp_finite_difference(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: Any = None, fd_step: float | None = None
    ) -> Tensor:
        base = self.base_tensors()
        # an eighth of the textbook eps^(1/3): on the test models truncation, not rounding, dominates
        step_scale = fd_step or self.fd_step or 0.125 * torch.finfo(self.dtype).eps ** (1 / 3)
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
                self._check_graph(loss)
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


def _method_name(name: str, math_sdpa: bool) -> str:
    return name + ("+math_sdpa" if math_sdpa else "")


def _message(err: BaseException) -> str:
    """An error's own words (an out-of-memory error's allocator message), or its type when it has none."""
    text = str(err).strip()
    if not text and err.__cause__ is not None:
        text = str(err.__cause__).strip()
    return text or type(err).__name__


def _at_least_float32(t: Tensor) -> Tensor:
    """Half-precision losses summed in float32; float32 and float64 ones kept as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
