"""The loss operator: loss, gradient and Hessian-vector products over a fixed probe set.

A measurement is ``algorithm(operator)``: Lanczos, Hutch++, the sharpness ascent and the
loss grid only ever call :class:`LossOperator`. The operator evaluates the model at
``θ + δ`` by substituting tensors for its parameters as :func:`torch.func.functional_call` does
(with the module's slots found once per operator), differentiates with :func:`torch.autograd.grad`,
and so never writes the module's weights, buffers or ``.grad``.

The loss over several batches is their sample-weighted mean, so a short last batch counts
for what it holds. Under data parallelism a ``reduce_fn`` (a sum across processes) makes
every quantity the mean over all processes' probe data.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import CheckpointError

from ._autograd import grads_or_zeros
from ._batches import apply_to_tensors, batch_size, clone_if_inference, scalar_loss, split_batch
from ._operator import EnteredOperator
from ._params import ParamsArg, ParamSpec, compute_dtype
from ._sharded import ShardedLossOperator, is_sharded

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
_PLAIN = ("double_backward", False)  # the method whose settled single products take LossOperator._kept_hvp
#: Under ``auto``, a double backward that runs out of memory with one vector at a time splits the probe batches
#: while the pieces keep at least this many samples (on average); below that it switches to finite differences.
FD_MIN_PIECE = 8


class MeasurementError(RuntimeError):
    """A measurement could not be completed (non-finite values, an op without the needed
    derivative, or a failure on another process)."""


class _GradientGraph(NamedTuple):
    """The gradient at θ of one probe part, with its graph, as :meth:`LossOperator._gradient_graph` keeps it."""

    #: the leaves the loss was differentiated at (detached views of the parameters, requiring grad)
    point: list[Tensor]
    #: the gradient as one flat vector with its graph (``None`` when it does not depend on the parameters)
    flat: Tensor | None
    #: the entries of a flat vector that ``flat`` holds (``None``: all; a parameter whose gradient is constant has none)
    columns: Tensor | None
    #: the whole flat gradient, detached
    gradient: Tensor
    #: the gradient of each parameter, with its graph where it has one (``flat`` holds those that have)
    grads: tuple[Tensor, ...]


class _OutOfMemory(RuntimeError):
    """Every failing process ran out of memory: retry with fewer vectors (or samples) at a time.

    Carries the allocator's message, so that a final failure still says what ran out and where."""


def _is_buffer(source: Any) -> bool:
    """Whether a substitution slot's source (see ``LossOperator._substitution_slots``) is a buffer's."""
    return isinstance(source, tuple) and source[0] == "buffer"


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
    return _named_leaves(output, _parameter_names(model))


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """``model``'s parameters by tensor id: name (tied ones under each of their names, the last one kept)."""
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def _named_leaves(output: Tensor, names: dict[int, str]) -> list[str]:
    """The names (``names``: by tensor id) of the tensors that are leaves of ``output``'s graph."""
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


class LossOperator(EnteredOperator):
    """Loss, gradient and Hessian-vector products of ``loss_fn`` over fixed ``batches``.

    Use it as a context manager: on entry the module is put in eval mode (unless
    ``eval_mode=False``), autocast is switched off and grad enabled (also under
    ``inference_mode``), sparse embeddings give dense gradients; on exit all of that is restored exactly.

    Checks that keep a number from being silently wrong (each once per operator, never per call):

    - **substitution**: the first graph built (or, before a loss-only evaluation, one forward pass on the first
      batch) is searched for the module's own parameters as leaves: a loss that reads a parameter through a
      Python list or a cached attribute bypasses the substitution, and is refused with
      :class:`MeasurementError` naming the parameter;
    - **the exact product** (``validate=True``): at the first product, on the first probe batch, ``u·Hv = v·Hu``
      for a random ``u`` and ``v`` the caller's first vector (a second random one if that vector has a zero or
      non-finite entry, i.e. misses some parameter), and ``Hu`` against finite differences of true gradients:
      first a forward difference from the gradient at θ (which the kept gradient graph holds: one more gradient);
      when that differs by more than a floor (``1e3·√eps``), the central difference at the same step, and then
      central differences at two step sizes (the comparison counts only where those two agree with each other,
      so the kinks of ReLU networks cannot trigger it). A product within the floor passes at the first stage, as
      it would at the last. Some PyTorch ops' double backward runs without an error and gives a wrong product
      (``parametrizations.weight_norm`` is one). Under ``auto`` a failed check switches to finite differences;
      an explicitly chosen method that fails it warns once. :attr:`product_check` says what was found and
      :attr:`check_hvps` what it cost.

    The products the first call computes anyway are not computed twice: with one probe batch (and no
    ``reduce_fn``) the product ``auto`` computes to choose its method, or the check's product of the caller's first
    vector, is that vector's answer (:attr:`probe_hvps` is then 0).

    Running out of memory in a product (every process alike): the kept gradient graphs are given back first,
    then the vectors per product are halved down to one, then the probe batches are split into halves, quarters,
    … Under ``auto`` double backward is split only while the pieces keep at least :data:`FD_MIN_PIECE` samples
    (on average over all processes' batches): below that it switches to finite differences (two gradients per
    product and no second-order graph, about a third of double backward's memory; exact to ``O(h²)``, and
    measuring a smoothed curvature at ReLU kinks), which split further down to single samples if they must;
    :attr:`memory_fallback` says so. An explicitly chosen method splits down to single samples, then raises
    :class:`MeasurementError` with the allocator's message.

    An FSDP2-sharded model (parameters are ``DTensor`` shards, as under ``ModelParallelStrategy``) gets a
    :class:`~lightning_landscape.functional._sharded.ShardedLossOperator` from this constructor: the same interface,
    vectors of local rows, finite-difference products (see that module for the design).

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
            batches are split into halves, quarters, … (losses and gradients do the same); see above for
            ``auto``'s switch to finite differences.
        cache_graph: keep each batch's gradient graph (``create_graph=True``) for the operator's lifetime,
            so a double-backward product costs one backward pass instead of a forward and two backward
            passes (PyHessian does this for one batch). Costs the graphs' memory; dropped on running out
            of memory.
        auto_method: with ``hvp_method="auto"``, the method an earlier operator on the same model chose
            (its :attr:`method`): skips choosing (and checking) again and keeps ``auto``'s batching of blocks.
        fd_step: relative size of the central finite-difference step (default ``eps^(1/3) / 8`` of the
            dtype, ~6e-4 in float32), scaled by ``(1 + rms(θ)) / max|v|``. Finite differences see the
            kinks of ReLU-like activations, which the autograd Hessian ignores: on such models they
            measure a different (smoothed) curvature.
        validate: check the exact product once, at the first product (see above). Callers that already
            checked the same model and method (the callbacks, after their first measurement) pass ``False``;
            the substitution check runs whatever ``validate`` says.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()
        >>> batches = [(torch.randn(8, 3), torch.randn(8, 1))]
        >>> with LossOperator(model, loss_fn, batches) as op:
        ...     hv = op.hvp(torch.ones(1, op.spec.numel))
        >>> hv.shape, op.product_check.startswith("passed")
        (torch.Size([1, 4]), True)
    """

    @property
    def space(self) -> Any:
        """The vector space of the operator's flat vectors: whole vectors, plain inner products."""
        from ._space import EUCLIDEAN

        return EUCLIDEAN

    def __new__(cls, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if cls is LossOperator and is_sharded(model):  # FSDP2: the sharded path, same interface
            kwargs.pop("reduce_fn", None)  # it reduces over the shards' process group itself
            return ShardedLossOperator(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: ParamsArg = None,
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
        #: product-equivalents spent checking the exact product (``validate``), once: two exact products and two
        #: gradients, about three (four when the finite differences' own spread is needed)
        self.check_hvps = 0
        #: what the exact-product check found ("" until it ran, or when ``validate=False``)
        self.product_check = ""
        #: whether that check failed (the chosen exact method disagreed with finite differences or itself)
        self.product_check_failed = False
        self._validate = validate
        self._graphs: dict[tuple[int, int], _GradientGraph] = {}
        self._building = threading.RLock()  # one thread at a time substitutes the parameters to build a graph
        self._restricted_failed = False  # restricted_hvp warned of an unexpected failure
        self._backward_reads_module: bool | None = None  # None until the first backward pass was checked
        self._loss_failed = False  # the last loss_fn call raised (a forward's error, not the backward pass's)
        self._own: dict[int, str] | None = None  # the module's parameters by id (see _own_parameters)
        self.size = self.spec.numel
        self.device = self.spec.device
        self._loss_fn = loss_fn
        self._selected = set(self.spec.names)
        self._slots: list[tuple[dict[str, Any], str, Any]] | None = None  # where substitution puts each tensor
        self._local_counts = [batch_size(b) for b in self.batches]
        self._total: float | None = None
        self._mean_batch = 1.0  # samples per probe batch over all processes (with the total, one reduction)
        self._parts_cache: tuple[int, list[tuple[float, Any]]] | None = None
        self._theta_leaves: list[Tensor] | None = None
        self._theta_rms: float | None = None  # rms(θ), for finite-difference steps
        # the first vector's whole product (by the method probe or the check), for hvp() to return instead of redoing
        self._first_product: tuple[tuple[str, bool], Tensor] | None = None
        #: whether ``auto`` left double backward for finite differences because one vector did not fit in memory
        self.memory_fallback = False
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
        self._first_product = None
        self._theta_leaves = None
        self._theta_rms = None
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

    def _collective(self, compute: Callable[[], Any], shape: Sequence[int]) -> Any:
        try:
            local, failure = compute(), None
        except Exception as err:
            if self.reduce_fn is None and not is_out_of_memory(err):
                raise
            local, failure = torch.zeros(shape, dtype=self.dtype, device=self.spec.device), err
        return self._reduce(local, failure)

    def _split_on_oom(self, compute: Callable[[], Any], shape: Sequence[int]) -> Any:
        """``_collective(compute)``, retried with the probe batches split in twice as many parts on running out
        of memory (every process together), until one sample at a time. (Without ``reduce_fn`` what ``compute``
        returns passes through as it is, whatever it is.)"""
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
            counts = [float(sum(self._local_counts)), float(len(self._local_counts))]
            total, batches = self._reduce(torch.tensor(counts, dtype=torch.float64, device=self.spec.device)).tolist()
            self._total, self._mean_batch = total, total / batches
        return self._total

    def _mean_samples(self) -> float:
        """Samples per probe batch, averaged over every process's batches (the same number on all of them)."""
        _ = self.total_samples  # (reduced together with the total)
        return self._mean_batch

    def _parts(self, batches: Sequence[Any] | None = None) -> list[tuple[float, Any]]:
        """``(weight, part)`` for every part of every probe batch (``batches``: others, weighted equally)."""
        if batches is not None:
            return [(1.0 / len(batches), b) for b in batches]
        if self._parts_cache is None or self._parts_cache[0] != self._pieces:  # the same until the batches split
            total = self.total_samples
            out = []
            for b in self.batches:
                for part in split_batch(b, self._pieces) if self._pieces > 1 else [b]:
                    out.append((batch_size(part) / total, part))
            self._parts_cache = (self._pieces, out)
        return self._parts_cache[1]

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

    def _substitution_slots(self) -> list[tuple[dict[str, Any], str, Any]]:
        """Where ``functional_call`` would put each tensor, found once per operator: ``(table, key, source)`` for
        the ``_parameters`` entry of every parameter name (tied names too) and, when buffers are substituted (see
        :meth:`_param_dict`), the ``_buffers`` entry of every buffer name. ``source``: the index of a selected
        tensor, a tensor to put as it is, or ``(kind, tensor)`` for a copy made per call."""
        if self._slots is None:
            index = {id(p): i for i, p in enumerate(self.spec.parameters())}
            slots: list[tuple[dict[str, Any], str, Any]] = []
            for name, p in self.model.named_parameters(remove_duplicate=False):
                owner, _, key = name.rpartition(".")
                table = self.model.get_submodule(owner)._parameters
                if id(p) in index:
                    source: Any = index[id(p)]
                else:  # unselected: a detached view (a float32 copy made per call when upcasting)
                    source = ("param", p) if self._upcast else self._input(p.detach())
                slots.append((table, key, source))
            if not self.eval_mode or self._upcast:  # train mode updates buffers in place: give it copies
                for name, b in self.model.named_buffers(remove_duplicate=False):
                    owner, _, key = name.rpartition(".")
                    slots.append((self.model.get_submodule(owner)._buffers, key, ("buffer", b)))
            self._slots = slots
        return self._slots

    def _copy(self, kind: str, t: Tensor) -> Tensor:
        """A per-call stand-in for an unselected parameter or a buffer (as :meth:`_param_dict` makes them)."""
        t = t.detach()
        if kind == "param":
            return self._input(t)
        if self._upcast and t.is_floating_point():
            return t.to(self.dtype)
        return t if self.eval_mode else t.clone()

    def _call_substituted(self, selected: Sequence[Tensor], batch: Any) -> Any:
        """``loss_fn(model, batch)`` with the module reading ``selected`` for the measured parameters.

        The same substitution as ``functional_call(model, self._param_dict(selected), ...)``: each parameter's (and
        substituted buffer's) entry in its module's ``_parameters``/``_buffers`` holds the given tensor during the
        call and the original after it, whatever the call did. Only the entries are found once per operator, not
        on every call (rebuilding the name maps each time cost a tenth of a gradient on a 2,410-parameter MLP);
        whether it substituted is checked once per operator like before (:meth:`_check_graph`). Unlike
        ``functional_call`` (torch 2.13), a submodule reached under two names gets its own parameters back."""
        if not self._substitutes_in_place():
            wrapper = _LossModule(self.model, self._loss_fn)
            return functional_call(wrapper, self._param_dict(selected), (batch,))  # which refuses them
        slots = self._substitution_slots()
        copies: dict[int, Tensor] = {}
        saved: list[Any] = []
        try:
            for table, key, source in slots:
                if isinstance(source, int):
                    value = selected[source]
                elif isinstance(source, Tensor):
                    value = source
                else:  # tied names share one copy, as functional_call's untying gives them
                    value = copies.get(id(source[1]))
                    if value is None:
                        value = copies[id(source[1])] = self._copy(*source)
                saved.append(table[key])
                table[key] = value
            self._loss_failed = True
            loss = self._loss_fn(self.model, batch)
            self._loss_failed = False
            return loss
        finally:  # last in, first out: a module reached under two names (one table, two slots) ends as it was
            for (table, key, _), original in reversed(list(zip(slots, saved, strict=False))):
                table[key] = original

    def _own_parameters(self) -> dict[int, str]:
        """The module's own parameters (by tensor id: name), as found the first time (before any is out of reach)."""
        if self._own is None:
            self._own = _parameter_names(self.model)
        return self._own

    def _checked_backward(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` (a forward and backward pass); the first time with the module's parameters out of its reach
        between the forward's substitutions (meta tensors in their place), where nothing should read them.

        Non-reentrant activation checkpointing (``checkpoint(..., use_reentrant=False)``) does: it recomputes its
        segment in the backward pass from the module's own parameters, not from the tensors the measurement put in
        their place, so second derivatives (and finite differences at a shifted point) would come out wrong without
        an error (whole-model λ1 3e-2 off, a layer's inside the segment 17–60%, on a small MLP with LayerNorm).
        Such a model is refused with :class:`MeasurementError` when that first pass fails in its backward pass with the
        parameters out of reach and not with them in place (a recomputation that reads no parameter recomputes exact
        values); an error of ``loss_fn`` itself is the caller's, raised as it is."""
        if self._backward_reads_module is False or not self._substitutes_in_place():
            return compute()
        if self._backward_reads_module:
            raise self._reads_module_error()
        self._own_parameters()  # (the substitution check's names, while the parameters are in place)
        self._loss_failed = False
        try:
            with self._parameters_out_of_reach():
                out = compute()
        except Exception as err:
            if is_out_of_memory(err):
                raise
            if self._loss_failed:  # the loss itself raised, not a recomputation in the backward pass: as it is
                raise  # (not tried again: a loss that fails once must not pass unseen; the next pass checks anew)
            try:
                compute()  # raises its own error if the parameters' absence was not the reason
            except CheckpointError as again:  # (the recomputation refused the stand-ins as well)
                err = again
            self._backward_reads_module = True
            raise self._reads_module_error() from err
        self._backward_reads_module = False
        return out

    @contextlib.contextmanager
    def _parameters_out_of_reach(self) -> Iterator[None]:
        """Meta tensors in the module's parameter entries: each forward still substitutes its own tensors for all
        of them, so only what reads the module in between (a recomputation in the backward pass) finds them."""
        slots = [(table, key) for table, key, source in self._substitution_slots() if not _is_buffer(source)]
        originals = [table[key] for table, key in slots]
        try:
            for table, key in slots:
                table[key] = torch.empty_like(table[key], device="meta")
            yield
        finally:
            for (table, key), original in reversed(list(zip(slots, originals, strict=True))):
                table[key] = original

    def _substitutes_in_place(self) -> bool:
        """Whether losses go through :meth:`_call_substituted`'s own substitution (not ``functional_call``)."""
        return not (torch.jit.is_tracing() or isinstance(self.model, (torch.jit.ScriptModule, nn.DataParallel)))

    @staticmethod
    def _reads_module_error() -> MeasurementError:
        return MeasurementError(
            "the loss's backward pass runs part of the forward again from the module's own parameters, not from the "
            "tensors the measurement puts in their place, so its derivatives would be wrong without an error. "
            "Non-reentrant activation checkpointing (torch.utils.checkpoint.checkpoint(..., use_reentrant=False)) "
            "does this: measure with checkpointing off (e.g. Hugging Face's model.gradient_checkpointing_disable())."
        )

    def _batch_loss(self, selected: Sequence[Tensor], batch: Any) -> Tensor:
        return scalar_loss(self._call_substituted(selected, batch))

    def _check_graph(self, loss: Tensor) -> None:
        """Refuse a loss that reads the module's parameters around ``functional_call`` (once per operator)."""
        if self._substitution_checked:
            return
        leaked = _named_leaves(loss, self._own_parameters())
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
        self._require_open()
        if self._substitution_checked:
            return
        first, pieces = self.batches[0], self._pieces
        while True:  # on running out of memory, on a half of the batch, a quarter, ...
            try:
                part = split_batch(first, pieces)[0] if pieces > 1 else first
                self._check_graph(self._batch_loss(self._leaves(), part))
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

    def _leaves(self, delta: Tensor | None = None) -> list[Tensor]:
        """Leaves at ``θ + δ`` that require grad, for the loss to be differentiated at: new ones for each ``δ``;
        at ``θ`` the same detached views of the parameters every call (while they still share their storage)."""
        if delta is not None or self._upcast:
            return [t.detach().requires_grad_(True) for t in self._shifted(delta)]
        params = self.spec.parameters()
        leaves = self._theta_leaves
        if leaves is None or any(a.data_ptr() != p.data_ptr() for a, p in zip(leaves, params, strict=True)):
            leaves = self._theta_leaves = [p.detach().requires_grad_(True) for p in params]
        return leaves

    def loss(self, delta: Tensor | None = None) -> Tensor:
        """The loss at ``θ + δ`` (``δ`` a flat vector, or ``None`` for ``θ``), a 0-dim tensor.

        No host synchronisation: the value stays on the device.
        """
        self._require_open()
        if not self._substitution_checked:
            self._split_on_oom(lambda: (self.check_substitution(), torch.zeros((), dtype=self.dtype))[1], ())

        def compute() -> Tensor:
            point = self._shifted(delta)
            with torch.no_grad():
                total = None
                for w, b in self._parts():
                    loss = _at_least_float32(self._batch_loss(point, b))
                    loss = loss if w == 1.0 else w * loss  # (1.0 * x is x: a single batch skips the op)
                    total = loss if total is None else total + loss
                return total

        return self._split_on_oom(compute, ())

    def gradient(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(loss, flat gradient)`` at ``θ + δ``."""
        self._require_open()
        n = self.spec.numel

        def local() -> tuple[Tensor, Tensor]:
            return self._checked_backward(summed)

        def summed() -> tuple[Tensor, Tensor]:
            point = self._leaves(delta)
            loss_sum: Tensor | None = None
            grad_sum: Tensor | None = None
            for w, b in self._parts():
                loss = self._batch_loss(point, b)
                self._check_graph(loss)
                weighted = loss if w == 1.0 else w * loss  # (1.0 * x is x: a single batch skips the op)
                grads = grads_or_zeros(weighted, point)
                flat, value = self.spec.flatten(grads), weighted.detach()
                grad_sum = flat if grad_sum is None else grad_sum + flat
                loss_sum = value if loss_sum is None else loss_sum + value
            return loss_sum.to(self.dtype), grad_sum

        if self.reduce_fn is None:  # nothing to reduce: the pair as it is (on running out of memory, split)
            return self._split_on_oom(local, ())

        def packed() -> Tensor:  # one vector to reduce: the gradient with the loss as its last entry
            loss, grad = local()
            return torch.cat([grad, loss.reshape(1)])

        out = self._split_on_oom(packed, (n + 1,))
        return out[n], out[:n]

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
        self._require_open()
        if vectors.dim() != 2 or vectors.shape[1] != self.spec.numel:
            raise ValueError(f"`vectors` must have shape [k, {self.spec.numel}], got {tuple(vectors.shape)}.")
        if vectors.dtype != self.dtype or vectors.device != self.spec.device:
            vectors = vectors.to(device=self.spec.device, dtype=self.dtype)
        if vectors.shape[0] == 1:
            kept = self._kept_hvp(vectors)
            if kept is not None:
                return kept
        while True:
            try:
                return self._products(vectors)
            except _OutOfMemory as err:
                self._make_room(err, vectors.shape[0])

    def _kept_hvp(self, vectors: Tensor) -> Tensor | None:
        """One vector's product straight from the kept gradient graph, once everything is settled (the method is
        plain double backward, checked, one probe part of weight one, one process, the graph kept), or ``None``.

        It runs the very operations :meth:`_products` runs in that case (the same ``autograd.grad`` call, flatten,
        row), without the layers between that the other cases need: about 40 µs of Python per product, ~7% of a
        product on a 2,410-parameter MLP. Any error goes the general way, which raises it or makes room."""
        if self._method != _PLAIN or self._validate or self._first_product is not None or self.reduce_fn is not None:
            return None
        graph = self._graphs.get((0, self._pieces)) if self.cache_graph else None
        if graph is None or graph.flat is None or graph.columns is not None:
            return None
        parts = self._parts()
        if len(parts) != 1 or parts[0][0] != 1.0:
            return None
        point, flat = graph.point, graph.flat
        try:
            hv = grads_or_zeros(flat, point, vectors[0], retain_graph=True)  # (zero rows: parameters not reached)
        except Exception:
            return None
        return self.spec.flatten(hv).unsqueeze(0)

    def restricted_hvp(self, vectors: Tensor, params: Sequence[int]) -> Tensor | None:
        """``H_PP V``: the Hessian block of the parameters at positions ``params`` of this operator (indices into
        its parameter list) times each row of ``vectors`` (``[k, their numel]``, flat in the order of ``params``),
        or ``None`` where this operator cannot give it.

        It back-propagates from those parameters' gradients in the kept gradient graphs (one per probe part), so
        autograd runs only what they need: for a late layer of a deep network, a small part of a whole product; and
        one graph serves every block, where operators restricted to each block would each build and keep their
        own. ``None`` until the product method is chosen and checked (call :meth:`hvp` once), and unless it is
        double backward with its graphs kept in one process (a ``reduce_fn`` would need the rows reduced),
        or when autograd fails here (out of memory: the kept graphs are then given back and no more are kept; any
        other error: a warning, once): then ask an operator restricted to those parameters. Several threads may
        call it at once (different blocks' products on a CPU run side by side that way): the products only read
        the kept graphs, and a graph that must be built first is built once, by one thread, while the others wait.

        Example:
            >>> model = torch.nn.Linear(2, 1)
            >>> loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
            >>> with LossOperator(model, loss_fn, [torch.tensor([[1.0, 2.0]])]) as op:
            ...     _ = op.hvp(torch.ones(1, op.size))             # chooses and checks the method
            ...     op.restricted_hvp(torch.tensor([[1.0, 0.0]]), [0])  # the weight's block: x xᵀ e1
            tensor([[1., 2.]])
        """
        self._require_open()
        count = len(self.spec.sizes)
        if not params or len(set(params)) != len(params) or not all(0 <= j < count for j in params):
            raise ValueError(f"`params` must be distinct indices into the operator's {count} parameters, got {params}.")
        sizes = [self.spec.sizes[j] for j in params]
        if vectors.dim() != 2 or vectors.shape[1] != sum(sizes):
            raise ValueError(f"`vectors` must have shape [k, {sum(sizes)}], got {tuple(vectors.shape)}.")
        double_backward = self._method is not None and self._method[0] == "double_backward"  # (math SDPA or not:
        # the graph was recorded with the attention backend chosen, its backward needs no context)
        if not double_backward or self._validate or self.reduce_fn is not None or not self.cache_graph:
            return None
        vectors = vectors.to(device=self.spec.device, dtype=self.dtype)
        seeds = [s.reshape(-1, *self.spec.shapes[j]) for s, j in zip(vectors.split(sizes, dim=1), params, strict=True)]
        try:
            total = None
            for i, (w, b) in enumerate(self._parts()):
                out = self._restricted_part(self._gradient_graph(b, (i, self._pieces)), params, seeds)
                out = out if w == 1.0 else out * w
                total = out if total is None else total + out
            return total
        except Exception as err:
            if is_out_of_memory(err):  # give the kept graphs back (and keep no more) before anyone builds others
                self._graphs.clear()
                self.cache_graph = False
                if self.spec.device.type == "cuda":
                    torch.cuda.empty_cache()
            elif not self._restricted_failed:  # not expected: say so once (the caller's fallback hides it otherwise)
                self._restricted_failed = True
                warnings.warn(
                    f"a restricted Hessian-vector product failed ({type(err).__name__}: {err}); it is left to an "
                    "operator over those parameters alone (e.g. block_curvature's per-block operators, slower).",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return None

    def _restricted_part(self, graph: _GradientGraph, params: Sequence[int], seeds: list[Tensor]) -> Tensor:
        """One probe part's restricted products (see :meth:`restricted_hvp`), ``[k, their numel]``."""
        k = seeds[0].shape[0]
        live = [(j, s) for j, s in zip(params, seeds, strict=True) if graph.grads[j].requires_grad]
        if not live:  # these parameters' gradients do not depend on the parameters: their block of H is zero
            return torch.zeros(k, sum(s[0].numel() for s in seeds), dtype=self.dtype, device=self.spec.device)
        outputs, inputs = [graph.grads[j] for j, _ in live], [graph.point[j] for j in params]
        if k > 1:  # (a parameter these gradients do not reach: zero rows, [k, ...] like the others)
            hv = grads_or_zeros(outputs, inputs, [s for _, s in live], is_grads_batched=True, retain_graph=True)
            return torch.cat([h.reshape(k, -1) for h in hv], dim=1)
        hv = grads_or_zeros(outputs, inputs, [s[0] for _, s in live], retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).unsqueeze(0)

    def _products(self, vectors: Tensor) -> Tensor:
        """The products, choosing (and checking) the method first if not done yet; raises :class:`_OutOfMemory`."""
        if self._method is None:
            self._method = self._resolve_method(vectors[:1])
        if self._validate:
            self._validate = False
            self._check_product(vectors[:1])
        first = None
        if self._first_product is not None:  # the first vector's product, computed choosing or checking: use it
            method, first = self._first_product
            self._first_product = None
            if method != self._method:  # the check switched methods
                first = None
            else:
                self.probe_hvps = 0
        rest = vectors if first is None else vectors[1:]
        out = [] if first is None else [first]
        if rest.shape[0]:
            chunk = self.chunk_size or rest.shape[0]
            out += [self._block_hvp(c) for c in (rest.split(chunk) if chunk < rest.shape[0] else [rest])]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _make_room(self, err: _OutOfMemory, k: int) -> None:
        """After running out of memory (every process alike): give back the kept gradient graphs; then halve the
        vectors per product, down to one; then, under ``auto`` with double backward, switch to finite differences
        once splitting the probe batches further would leave pieces under :data:`FD_MIN_PIECE` samples (on
        average over all processes, so that all decide alike); then split the probe batches, down to single
        samples (see the class docstring)."""
        if self._graphs or self._first_product is not None:  # first give back the kept gradient graphs
            self._graphs.clear()
            self._first_product = None
            self.cache_graph = False
        elif self._method is not None and (self.chunk_size or k) > 1:  # (the choosing product is one vector)
            self.chunk_size = max(1, (self.chunk_size or k) // 2)  # remembered: later products start from it
        elif (
            self._auto
            and (self._method is None or self._method[0] == "double_backward")
            and self._mean_samples() / (2 * self._pieces) < FD_MIN_PIECE
        ):
            self._method = ("finite_difference", False)  # two gradients, no graph of the gradient kept
            self._validate = False  # (finite differences are what the check compares against)
            self.memory_fallback = True
            self.cache_graph = False
        else:
            try:
                self._more_pieces(err)
            except MeasurementError as final:
                raise MeasurementError(f"out of memory even one vector at a time: {final}") from None
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
        self._require_open()
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
        """Try the ``auto`` chain on one vector and the first batch (on its kept gradient graph); all processes
        agree. Running out of memory is not a method's failure: it raises :class:`_OutOfMemory` for the caller to
        make room. With one probe batch and one process the product is the first vector's whole product: it is
        kept for :meth:`hvp` to return instead of computing it again. An error of ``loss_fn`` itself is raised as it
        is in one process (not a method's failure: the next method would hide it)."""
        errors = []
        for name, math_sdpa in _AUTO_CHAIN:
            hv: Tensor | None = None
            try:
                self.probe_hvps = 1
                self._loss_failed = False
                hv = self._local_hvp(probe, name, math_sdpa, first=True)
                failure = None if bool(torch.isfinite(hv).all()) else MeasurementError("non-finite HVP")
            except (RuntimeError, NotImplementedError) as err:
                if self._loss_failed and self.reduce_fn is None and not is_out_of_memory(err):
                    raise  # loss_fn's own error, not the method's: as it is (several processes must agree: below)
                failure = err
            if failure is not None:
                self._graphs.clear()  # a graph built for a method (or attention backend) that failed: not re-used
            try:
                self._reduce(torch.zeros(1, dtype=self.dtype, device=self.spec.device), failure)
            except _OutOfMemory:
                raise
            except (RuntimeError, NotImplementedError, MeasurementError) as err:
                errors.append(f"{name}{'+math_sdpa' if math_sdpa else ''}: {type(err).__name__}: {_message(err)}")
                continue
            if hv is not None and self.reduce_fn is None and len(self._parts()) == 1:
                self._first_product = ((name, math_sdpa), hv)
            return name, math_sdpa
        raise MeasurementError("no Hessian-vector-product method works for this model: " + "; ".join(errors))

    def _check_product(self, first: Tensor) -> None:
        """Check the exact product once, on the first probe batch; see the class docstring. ``first`` (``[1, n]``) is
        the caller's first vector. Under ``auto`` a failure switches to finite differences; otherwise it warns."""
        name, math_sdpa = self._method
        if name == "finite_difference":
            return
        gen = torch.Generator().manual_seed(0)
        uv = torch.randn(2, self.spec.numel, generator=gen, dtype=self.dtype).to(self.spec.device)
        uv = uv / uv.norm(dim=1, keepdim=True)
        u = uv[0]
        eps = torch.finfo(self.dtype).eps
        step = self.fd_step or 0.125 * eps ** (1 / 3)
        tiny = torch.finfo(self.dtype).tiny
        floor = 1e3 * eps ** (1 / 2)  # a difference from finite differences below this passes, whatever their spread
        # the caller's first vector is the second vector of the symmetry test when it touches every parameter (its
        # product is needed anyway: kept for hvp() to return); otherwise a second random one
        q = first[0]
        mine = bool((torch.isfinite(q) & (q != 0)).all())
        kept = self._first_product[1][0] if mine and self._first_product is not None else None
        keep = mine and kept is None and self.reduce_fn is None and len(self._parts()) == 1
        batch = self._parts()[0][1]
        base = self.base_tensors()
        h = self._fd_step(base, u, step)
        local: dict[str, Tensor] = {}

        def products() -> Tensor:  # exact products, and a forward difference from the gradient the graph holds
            if mine:
                hq = kept if kept is not None else self._local_hvp(first, name, math_sdpa, first=True)[0]
                if keep:
                    self._first_product = (self._method, hq.unsqueeze(0))
                hu = self._local_hvp(uv[:1], name, math_sdpa, first=True)[0]
                qn = q.norm()
                v, hv = q / qn, hq / qn
            else:
                hu, hv = self._local_hvp(uv, name, math_sdpa, first=True)
                v = uv[1]
            if name.startswith("double_backward") and self.cache_graph:
                at_theta = self._gradient_graph(batch, (0, self._pieces)).gradient
            else:
                at_theta = self._gradient_at(base, u, 0.0, batch)
            local["hu"], local["plus"] = hu, self._gradient_at(base, u, h, batch)
            forward = (local["plus"] - at_theta) / h
            # every inner product the two figures need, from one float64 Gram matrix (a few operations, not dozens)
            g = (lambda m: m @ m.T)(torch.stack([u, v, hu, hv, forward]).double()).tolist()
            asym = abs(g[0][3] - g[1][2]) / max(math.sqrt(g[3][3]) + math.sqrt(g[2][2]), tiny)
            err = math.sqrt(max(g[2][2] - 2 * g[2][4] + g[4][4], 0.0)) / max(math.sqrt(g[4][4]), tiny)
            return torch.tensor([asym, err], dtype=self.dtype, device=self.spec.device)

        def central() -> Tensor:  # the central difference at the same step (one more gradient)
            local["fd"] = (local["plus"] - self._gradient_at(base, u, -h, batch)) / (2 * h)
            return ((local["hu"] - local["fd"]).norm() / local["fd"].norm().clamp_min(tiny)).reshape(1)

        def spread() -> Tensor:  # central differences at twice the step: how far to trust them
            fd2 = self._local_hvp(uv[:1], "finite_difference", False, first=True, fd_step=2 * step)[0]
            return ((fd2 - local["fd"]).norm() / local["fd"].norm().clamp_min(tiny)).reshape(1)

        # Stages, each only when the one before found a difference above the floor (a right product passes at the
        # first, in float32 always): a forward difference (one gradient); the central difference at that step (one
        # more); the central one at twice the step, whose disagreement with the first says how far to trust them
        # (two more). Each is reduced as a sum over processes (bounding their maximum): every process decides alike.
        try:
            asym, err = (float(x) for x in self._collective(products, (2,)))
            gradients, how, spread_ = 1, "forward", None
            if err > floor:
                err, gradients, how = float(self._collective(central, (1,))), 2, "central"
                if err > floor:
                    spread_, gradients = float(self._collective(spread, (1,))), 4
        except _OutOfMemory:  # the check does not fit beside the measurement: nothing to learn, go on without it
            self.product_check = "not run (out of memory)"
            return
        # what the check cost beyond the caller's products: exact ones it did not give back, gradients in pairs
        self.check_hvps = (1 if mine and (kept is not None or keep) else 2) + (gradients + 1) // 2
        sym_tol = 1000 * eps
        fd_says = spread_ is not None and spread_ < 0.1 and err > max(10 * spread_, floor)  # smooth, and disagree
        figures = f"asymmetry {asym:.1e} (tolerance {sym_tol:.0e}), difference from {how} finite differences {err:.1e}"
        figures += f" (their own spread {spread_:.1e})" if spread_ is not None else f" (< {floor:.0e})"
        if asym <= sym_tol and not fd_says:
            self.product_check = f"passed: {figures}"
            return
        self.product_check_failed = True
        self._first_product = None
        if self._auto:
            self._method = ("finite_difference", False)
            self._graphs.clear()  # (double backward's graphs: no longer needed)
            self.product_check = f"{_method_name(name, math_sdpa)} failed the check ({figures}); now finite_difference"
        else:
            self.product_check = f"{_method_name(name, math_sdpa)} failed the check ({figures})"
            warnings.warn(
                f"hvp_method={name!r} gives a wrong Hessian-vector product for this model: {figures}. Some PyTorch "
                "ops' double backward is wrong without an error (e.g. parametrizations.weight_norm); use "
                "hvp_method='auto' or 'finite_difference'.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _local_hvp(
        self,
        vectors: Tensor,
        name: str,
        math_sdpa: bool,
        batches: Sequence[Any] | None = None,
        fd_step: float | None = None,
        first: bool = False,
    ) -> Tensor:
        """This process's products over its probe batches (``batches``: others, weighted equally; ``first``: the
        first part of the probe alone, with weight one, on its kept gradient graph)."""
        cached = batches is None  # the operator's own batches: their gradient graphs may be kept
        parts = [(1.0, self._parts()[0][1])] if first else self._parts(batches)
        compute = self._product(name)
        with _math_attention() if math_sdpa else contextlib.nullcontext():
            total = None
            for i, (w, b) in enumerate(parts):
                key = (i, self._pieces) if cached else None
                out = compute(vectors, b, batched=name == "double_backward_batched", key=key, fd_step=fd_step)
                out = out if w == 1.0 else out * w  # (1.0 * x is x: one batch skips the op)
                total = out if total is None else total + out
        return total

    def _product(self, name: str) -> Callable[..., Tensor]:
        """The per-batch product function of method ``name`` (see :data:`HVP_METHODS`)."""
        if name.startswith("double_backward"):
            return self._hvp_double_backward
        if name == "forward_over_reverse":
            return self._hvp_forward_over_reverse
        return self._hvp_finite_difference

    def _gradient_graph(self, batch: Any, key: Any) -> _GradientGraph:
        """The gradient at θ with its graph (see :class:`_GradientGraph`), cached under ``key``."""
        keep = key is not None and self.cache_graph
        if keep and key in self._graphs:
            return self._graphs[key]
        with self._building:  # (restricted_hvp may run in several threads; products on kept graphs need no lock)
            graph = self._graphs.get(key) if keep else None
            if graph is not None:
                return graph
            return self._checked_backward(lambda: self._build_gradient_graph(batch, key, keep))

    def _build_gradient_graph(self, batch: Any, key: Any, keep: bool) -> _GradientGraph:
        point = [t.detach().requires_grad_(True) for t in self.base_tensors()]
        loss = self._batch_loss(point, batch)
        self._check_graph(loss)
        once = once_differentiable_functions(loss)
        if once:
            raise MeasurementError(
                f"double backward would silently drop the second derivative through {', '.join(once)} "
                "(marked @once_differentiable); use hvp_method='finite_difference' (or 'auto', which falls back to it)."
            )
        grads = grads_or_zeros(loss, point, create_graph=True)  # (a parameter the loss does not read: zero, no graph)
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        # one flat output: each product back-propagates one vector, not one piece per parameter
        flat = torch.cat([grads[i].reshape(-1) for i in live]) if live else None
        columns = None
        if live and len(live) < len(grads):
            offsets = [0, *itertools.accumulate(self.spec.sizes)]
            columns = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in live]).to(self.spec.device)
        graph = _GradientGraph(point, flat, columns, self.spec.flatten(grads).detach(), grads)
        if keep:
            self._graphs[key] = graph
        return graph

    def _hvp_double_backward(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: Any = None, fd_step: float | None = None
    ) -> Tensor:
        point, flat, columns, _, _ = self._gradient_graph(batch, key)
        keep = key is not None and self.cache_graph
        if flat is None:  # the gradient does not depend on the parameters: H = 0
            return torch.zeros_like(vectors)
        seeds = vectors if columns is None else vectors[:, columns]
        if batched:
            hv = grads_or_zeros(flat, point, seeds, is_grads_batched=True, retain_graph=keep)
            return self.spec.flatten(hv).detach()
        rows = []
        for j in range(vectors.shape[0]):
            retain = keep or j + 1 < vectors.shape[0]
            hv = grads_or_zeros(flat, point, seeds[j], retain_graph=retain)  # (zero rows: parameters not reached)
            rows.append(self.spec.flatten(hv))  # (no graph: create_graph is off)
        return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)

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

    def _fd_step(self, base: Sequence[Tensor], v: Tensor, step_scale: float | None = None) -> float:
        """The finite-difference step along ``v``: ``step_scale · (1 + rms(θ)) / max|v|`` (0 for a zero ``v``), so no
        coordinate moves by more than ``step_scale · (1 + rms(θ))``. An rms-scaled step moved the few hundred
        residual-stream coordinates a transformer's top eigenvector lives on by O(1): the product there was 83% off
        in float32 (0.55% with this step; ``tests/test_sharded_transformer.py``)."""
        # an eighth of the textbook eps^(1/3): on the test models truncation, not rounding, dominates
        step_scale = step_scale or self.fd_step or 0.125 * torch.finfo(self.dtype).eps ** (1 / 3)
        if self._theta_rms is None:  # θ is fixed for the operator's life (its kept graphs assume it too)
            norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in base])
            self._theta_rms = float(torch.linalg.vector_norm(norms)) / math.sqrt(self.spec.numel)
        v_max = float(v.abs().amax()) if v.numel() else 0.0
        return 0.0 if v_max == 0.0 else step_scale * (1.0 + self._theta_rms) / v_max

    def _gradient_at(self, base: Sequence[Tensor], v: Tensor, h: float, batch: Any) -> Tensor:
        """The flat gradient of ``batch``'s loss at ``θ + h·v`` (``base`` the values of θ), no graph kept."""

        def compute() -> Tensor:
            shifted = zip(base, self.spec.split(v), strict=False)
            point = [torch.add(b, d, alpha=h).requires_grad_(True) for b, d in shifted]
            loss = self._batch_loss(point, batch)
            self._check_graph(loss)
            return self.spec.flatten(grads_or_zeros(loss, point))

        return self._checked_backward(compute)

    def _hvp_finite_difference(
        self, vectors: Tensor, batch: Any, batched: bool = False, key: Any = None, fd_step: float | None = None
    ) -> Tensor:
        base = self.base_tensors()
        out = torch.zeros_like(vectors)
        for j, v in enumerate(vectors):
            h = self._fd_step(base, v, fd_step)
            if h == 0.0:
                continue
            plus, minus = (self._gradient_at(base, v, sign * h, batch) for sign in (1.0, -1.0))
            out[j] = (plus - minus).detach() / (2 * h)
        return out


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    vectors: Tensor,
    params: ParamsArg = None,
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
