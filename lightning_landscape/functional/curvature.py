"""Generalized Gauss–Newton and Fisher products over a probe set, as operators the Hessian's algorithms run on.

The GGN of a loss ``L(θ) = ℓ(f(θ))`` is ``Jᵀ H_ℓ J``: ``J`` the Jacobian of the model output ``f`` in the
parameters, ``H_ℓ`` the Hessian of the output loss in the output. A product ``G v`` is a forward-mode product
``J v`` (dual tensors for one vector, :func:`torch.func.vmap` over :func:`torch.func.jvp` for a block), ``H_ℓ`` on
the small output (a closed form for cross-entropy and mean squared error, exact autograd for a callable) and a
vector-Jacobian product ``Jᵀ(·)``: no double backward through the model, so it also works where double backward
does not. Where forward mode is missing for some op, ``J v`` falls back to
the double-vjp trick (a backward of the backward, linear in its seed).

The GGN needs the output separated from the loss, which ``loss_fn(model, batch)`` hides: a
:class:`CurvatureOperator` takes ``output_fn(model, batch) -> output`` (default ``model(batch[0])``) and
``output_loss`` (``"cross_entropy"``, ``"mse"`` or a callable ``(output, batch) -> scalar``, mean-reduced over the
batch like the user's loss; the built-in losses take ``batch[1]`` as the target).

Which Fisher:

- ``"fisher"``: the **Monte-Carlo Fisher**: targets drawn (once per operator, from the caller's generator) from the
  model's own predictive distribution, ``mc_samples`` per output unit; the output-space matrix is the mean of
  ``g gᵀ`` over the draws, ``g`` the gradient of one unit's loss. Units: each position of the class dimension for
  cross-entropy (softmax; ``g = p - onehot``), each output entry for MSE (a Gaussian of variance ½, the one whose
  negative log-likelihood is ``(f - y)²``; ``g = 2(f - y)``). Its expectation is the exact Fisher, which for these
  two losses *equals the GGN* (so ``curvature="ggn"`` is the exact Fisher). Not available for a callable loss.
- ``"empirical_fisher"``: the **empirical Fisher** ``(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with the data's own targets,
  ``ℓ_n`` the loss of sample ``n`` (``L = (1/N) Σ_n ℓ_n``, samples along the output's first dimension); its
  per-sample output gradients come from autograd on the output, so any output loss works.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn

from ._autograd import grads_or_zeros
from ._params import ParamsArg
from ._random import make_generator
from ._sharded import is_sharded
from ._space import EUCLIDEAN, VectorSpace
from .hvp import LossFn, LossOperator, ReduceFn, _math_attention

__all__ = ["CURVATURES", "OUTPUT_LOSSES", "CurvatureOperator", "curvature_operator", "default_output_fn"]

#: What a curvature measurement can be of.
CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")
#: The built-in output losses (a callable ``(output, batch) -> scalar`` is the third kind).
OUTPUT_LOSSES = ("cross_entropy", "mse")

#: How ``J v`` is computed, in the order tried: forward mode, forward mode with math attention, the double-vjp trick
#: (``torch.func.linearize`` would save half of a forward-mode product, but tracing it cost 130-260 ms on the digits
#: MLP and CNN, the price of 50-500 products: more than a top-k or trace measurement takes).
_JV_CHAIN = (("jvp", False), ("jvp", True), ("double_vjp", False), ("double_vjp", True))

OutputFn = Callable[[nn.Module, Any], Tensor]
OutputLoss = Callable[[Tensor, Any], Tensor]


def default_output_fn(model: nn.Module, batch: Any) -> Tensor:
    """``model(batch[0])``: the output of an ``(x, y)`` batch.

    Example:
        >>> default_output_fn(torch.nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
    """
    return model(batch[0])


def _builtin_loss(name: str) -> OutputLoss:
    if name == "cross_entropy":
        return lambda out, batch: F.cross_entropy(out, batch[1])
    return lambda out, batch: F.mse_loss(out, batch[1])


class CurvatureOperator(LossOperator):
    """GGN or Fisher products of a split loss ``output_loss(output_fn(model, batch), batch)`` over ``batches``.

    The same interface as :class:`~lightning_landscape.functional.LossOperator` (``size``, ``dtype``, ``device``,
    ``matmat``, ``space``, ``method``, ``probe_hvps`` = 0, ``loss()``/``gradient()`` of the composed loss, a
    context manager that puts the module in eval mode and restores everything on exit, substitution instead of
    writing weights, ``.grad`` untouched), so :func:`~lightning_landscape.functional.eigen.top_eigenvalues`,
    :func:`~lightning_landscape.functional.trace.trace_estimate` and
    :func:`~lightning_landscape.functional.trace.slq_density` run on it unchanged. Over several batches (and
    processes, through ``reduce_fn``) the matrix is the sample-weighted mean, like the loss. See the module
    docstring for which Fisher is which.

    ``method`` says how ``J v`` was computed: ``"ggn/jvp"`` (forward mode; blocks of vectors batched with
    :func:`torch.func.vmap` where it works, else one vector at a time), with ``"+math_sdpa"`` when attention had
    to use the math backend (fused attention kernels have no forward mode), or ``"ggn/double_vjp"`` (an op without
    forward mode: warns). While it computes ``J v``, ``nn.MultiheadAttention``'s inference fast path is switched
    off (it has no forward mode either). The output's graph (for ``Jᵀ``) and what ``H_ℓ`` needs are kept per probe
    batch for the operator's life, as the Hessian's ``cache_graph`` keeps the gradient's.

    Args:
        model: the module; its weights are never written.
        batches: probe batches (already on the model's device).
        params: the parameters (tensors or names); default every parameter with ``requires_grad``.
        curvature: ``"ggn"``, ``"fisher"`` (Monte-Carlo) or ``"empirical_fisher"``.
        output_fn: ``output_fn(model, batch) -> output`` with the samples along dim 0 (default ``model(batch[0])``).
        output_loss: ``"cross_entropy"`` (classes along dim 1, as :func:`torch.nn.functional.cross_entropy`),
            ``"mse"`` (:func:`torch.nn.functional.mse_loss`, mean over every entry) or a callable
            ``(output, batch) -> scalar``.
        eval_mode: measure in eval mode.
        reduce_fn: sums a tensor across processes (DDP); ``None``: one process.
        mc_samples: targets drawn per output unit for ``"fisher"``.
        generator: the source of those draws (``None``: a fresh one with the package's default seed).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Linear(3, 2)
        >>> batches = [(torch.randn(8, 3), torch.randn(8, 2))]
        >>> with CurvatureOperator(model, batches, curvature="ggn", output_loss="mse") as op:
        ...     g = op.matmat(torch.eye(op.size))
        >>> x = batches[0][0]   # linear model, MSE: GGN = Hessian; the block of the first output's weights
        >>> torch.allclose(g[:3, :3], 2 * x.T @ x / 16, atol=1e-5), op.method
        (True, 'ggn/jvp')
    """

    space: VectorSpace = EUCLIDEAN

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        params: ParamsArg = None,
        *,
        curvature: str = "ggn",
        output_fn: OutputFn | None = None,
        output_loss: str | OutputLoss = "cross_entropy",
        eval_mode: bool = True,
        reduce_fn: ReduceFn | None = None,
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        if curvature not in CURVATURES[1:]:
            raise ValueError(f"`curvature` must be one of {CURVATURES[1:]} for a CurvatureOperator, got {curvature!r}.")
        if isinstance(output_loss, str):
            if output_loss not in OUTPUT_LOSSES:
                raise ValueError(f"`output_loss` must be one of {OUTPUT_LOSSES} or a callable, got {output_loss!r}.")
        elif not callable(output_loss):
            raise ValueError(f"`output_loss` must be one of {OUTPUT_LOSSES} or a callable, got {output_loss!r}.")
        if output_fn is not None and not callable(output_fn):
            raise ValueError(f"`output_fn` must be callable as output_fn(model, batch), got {output_fn!r}.")
        if curvature == "fisher" and not isinstance(output_loss, str):
            raise ValueError(
                "`curvature='fisher'` (Monte-Carlo) samples targets from the model's predictive distribution, which "
                f"only the built-in `output_loss` {OUTPUT_LOSSES} define; use 'ggn' or 'empirical_fisher' for a "
                "callable loss."
            )
        if mc_samples < 1:
            raise ValueError(f"`mc_samples` must be >= 1, got {mc_samples}.")
        if is_sharded(model):
            raise ValueError(
                f"`curvature={curvature!r}` is not supported on a sharded (FSDP2) model: only curvature='hessian' is."
            )
        output_fn = output_fn or default_output_fn
        loss_of_output = _builtin_loss(output_loss) if isinstance(output_loss, str) else output_loss

        def composed(m: nn.Module, batch: Any) -> Tensor:
            return loss_of_output(output_fn(m, batch), batch)

        super().__init__(
            model, composed, batches, params, hvp_method="auto", eval_mode=eval_mode, reduce_fn=reduce_fn,
            validate=False,
        )  # fmt: skip
        self.curvature = curvature
        self.output_loss = output_loss
        self.mc_samples = mc_samples
        self._output_fn = output_fn
        self._loss_of_output = loss_of_output
        self._generator = generator
        self._jv: tuple[str, bool] | None = None  # (how J·v is computed, math attention), chosen at the first product
        self._vmap_jvp = True  # whether vmap over forward mode works for this model (else one vector at a time)
        self._batched_vjp = True  # whether a batched backward (is_grads_batched) does
        self._cache: dict[int, tuple[list[Tensor], Tensor, Any]] = {}  # part -> (leaves, output, output matrix)

    @property
    def method(self) -> str:
        """How ``J v`` is computed: ``"<curvature>/jvp"`` or ``"<curvature>/double_vjp"``, with ``"+math_sdpa"`` when
        attention had to use the math backend (``"<curvature>"`` before the first product)."""
        if self._jv is None:
            return self.curvature
        return f"{self.curvature}/{self._jv[0]}" + ("+math_sdpa" if self._jv[1] else "")

    def __exit__(self, *exc: object) -> None:
        self._cache.clear()
        super().__exit__(*exc)

    # ------------------------------------------------------------------ the output
    def _output_at(self, selected: Sequence[Tensor], batch: Any) -> Tensor:
        """``output_fn(model, batch)`` with ``selected`` substituted for the measured parameters."""
        loss_fn, self._loss_fn = self._loss_fn, self._output_fn
        try:
            out = self._call_substituted(selected, batch)
        finally:
            self._loss_fn = loss_fn
        if not isinstance(out, Tensor) or out.dim() == 0:
            got = "a 0-dim tensor" if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"`output_fn` must return a tensor with the samples along dim 0, got {got}.")
        return out

    def _part(self, i: int, batch: Any) -> tuple[list[Tensor], Tensor, Any]:
        """The output of part ``i`` with its graph (for ``Jᵀ``), and what its output-space matrix needs."""
        if i not in self._cache:  # (kept for the operator's life: θ and the probe batches do not change in it)
            leaves = [t.detach().requires_grad_(True) for t in self.base_tensors()]
            out = self._output_at(leaves, batch)
            self._check_graph(out)
            self._cache[i] = (leaves, out, self._output_matrix(out.detach(), batch))
        return self._cache[i]

    # ------------------------------------------------------------------ the output-space matrix
    def _output_matrix(self, out: Tensor, batch: Any) -> Any:
        """What ``M u`` needs for this part's output ``out`` (detached): the softmax, per-sample gradients, ..."""
        if self.curvature == "ggn":
            if self.output_loss == "cross_entropy":
                return _check_classes(out).softmax(dim=1)
            if self.output_loss == "mse":
                return None
            f = out.clone().requires_grad_(True)  # a callable loss: its Hessian by autograd on the output
            g = torch.autograd.grad(self._scalar(self._loss_of_output(f, batch)), f, create_graph=True)[0]
            return f, g
        if self.curvature == "empirical_fisher":  # N · ∂L/∂f_n is the gradient of sample n's loss
            f = out.clone().requires_grad_(True)
            g = torch.autograd.grad(self._scalar(self._loss_of_output(f, batch)), f)[0]
            return (g * out.shape[0]).reshape(out.shape[0], -1)
        gen = self._generator = make_generator(self._generator)
        s = self.mc_samples
        if self.output_loss == "cross_entropy":  # g = p - onehot(ŷ) per position, ŷ ~ softmax
            p = _check_classes(out).softmax(dim=1).movedim(1, -1)  # [..., C]
            flat = p.reshape(-1, p.shape[-1]).double()
            draws = torch.multinomial(flat.to(gen.device), s, replacement=True, generator=gen).to(out.device)
            g = p.reshape(-1, 1, p.shape[-1]) - F.one_hot(draws, p.shape[-1]).to(p.dtype)  # [units, s, C]
            if s < p.shape[-1]:  # the draws themselves are the smaller form (many classes, few draws)
                return g / s**0.5
            return torch.einsum("usc,usd->ucd", g, g) / s  # each unit's mean of g gᵀ: [units, C, C]
        # mse: a Gaussian of variance ½ around f: g = 2(f - y) = -√2 ε
        eps = torch.randn((out.numel(), s), generator=gen, device=gen.device, dtype=out.dtype).to(out.device)
        return 2 * eps.pow(2).mean(dim=1)  # each unit's mean of g²: [units]

    @staticmethod
    def _scalar(loss: object) -> Tensor:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`output_loss` must return a scalar tensor, got {shape}.")
        return loss.reshape(())

    def _apply_output_matrix(self, u: Tensor, out: Tensor, m: Any) -> Tensor:
        """``H_ℓ u`` (or the Fisher's output matrix) for a block ``u`` of output tangents ``[k, *out.shape]``."""
        k = u.shape[0]
        if self.curvature == "ggn":
            if self.output_loss == "cross_entropy":  # (diag p - ppᵀ) u per position, mean over the positions
                units = out.numel() // out.shape[1]
                pu = m * u
                return (pu - m * pu.sum(dim=2, keepdim=True)) / units
            if self.output_loss == "mse":
                return u * (2.0 / out.numel())
            f, g = m
            try:
                return torch.autograd.grad(g, f, u, retain_graph=True, is_grads_batched=True)[0]
            except RuntimeError:
                return torch.stack([torch.autograd.grad(g, f, row, retain_graph=True)[0] for row in u])
        if self.curvature == "empirical_fisher":  # (1/N) Σ_n g_n g_nᵀ u_n
            n = out.shape[0]
            flat = u.reshape(k, n, -1)
            return ((flat * m).sum(dim=2, keepdim=True) * m / n).reshape(u.shape)
        if self.output_loss == "cross_entropy":  # each unit's mean of g gᵀ, mean over the units
            c = out.shape[1]
            units = out.numel() // c
            flat = u.movedim(2, -1).reshape(k, units, c)
            if m.shape[1] == c:  # [units, C, C]: the mean of g gᵀ
                res = torch.einsum("kuc,ucd->kud", flat, m) / units
            else:  # [units, s, C]: the draws' g/√s
                res = torch.einsum("kuc,usc,usd->kud", flat, m, m) / units
            return res.reshape(k, *out.movedim(1, -1).shape).movedim(-1, 2)
        return (u.reshape(k, -1) * m / out.numel()).reshape(u.shape)  # mse

    # ------------------------------------------------------------------ products
    def matmat(self, vectors: Tensor) -> Tensor:
        """Alias of :meth:`hvp`: the :class:`SymmetricOperator` interface the algorithms call."""
        return self.hvp(vectors)

    def hvp(self, vectors: Tensor) -> Tensor:
        """Curvature-matrix products ``G v`` for each row of ``vectors`` (``[k, numel]`` → ``[k, numel]``)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.spec.numel:
            raise ValueError(f"`vectors` must have shape [k, {self.spec.numel}], got {tuple(vectors.shape)}.")
        vectors = vectors.to(device=self.spec.device, dtype=self.dtype)

        def local() -> Tensor:
            total = None
            for i, (w, b) in enumerate(self._parts()):
                out = self._part_product(i, b, vectors)
                out = out if w == 1.0 else out * w
                total = out if total is None else total + out
            return total

        return self._collective(local, tuple(vectors.shape))

    def _part_product(self, i: int, batch: Any, vectors: Tensor) -> Tensor:
        leaves, out, m = self._part(i, batch)
        jv = self._jacobian_products(leaves, out, batch, vectors)
        mu = self._apply_output_matrix(jv, out.detach(), m)
        return self._transpose_products(leaves, out, mu)

    def _jacobian_products(self, leaves: list[Tensor], out: Tensor, batch: Any, vectors: Tensor) -> Tensor:
        """``J v`` for each row of ``vectors``: forward mode; where an op lacks it, forward mode with the math attention
        backend (fused attention kernels have none), then the double-vjp trick (which needs double backward; warns)."""
        chain = _JV_CHAIN if self._jv is None else (self._jv,)
        for j, (name, math_sdpa) in enumerate(chain):
            try:
                with _math_attention() if math_sdpa else contextlib.nullcontext(), _no_mha_fastpath():
                    if name == "double_vjp":
                        jv = self._double_vjp(leaves, out, vectors)
                    else:
                        jv = self._jvp(batch, vectors)
            except (RuntimeError, NotImplementedError) as err:
                if self._jv is not None or j + 1 == len(chain):
                    raise
                if chain[j + 1][0] == "double_vjp" and name != "double_vjp":
                    warnings.warn(
                        f"forward-mode J·v failed ({type(err).__name__}: {err}); using the double-vjp trick",
                        RuntimeWarning,
                        stacklevel=5,
                    )
                continue
            self._jv = (name, math_sdpa)
            return jv
        raise AssertionError("unreachable")  # (the loop returns or raises)

    def _jvp(self, batch: Any, vectors: Tensor) -> Tensor:
        """Forward-mode ``J v``: one vector through dual tensors (:mod:`torch.autograd.forward_ad`, about half the
        overhead of :func:`torch.func.jvp` on the digits MLP), a block by :func:`torch.func.vmap` over
        :func:`torch.func.jvp` (one vector at a time where vmap fails)."""
        base = tuple(t.detach() for t in self.base_tensors())

        def dual(v: Tensor) -> Tensor:
            with fwAD.dual_level():
                point = [fwAD.make_dual(b, t) for b, t in zip(base, self.spec.split(v), strict=True)]
                return fwAD.unpack_dual(self._output_at(point, batch)).tangent

        if self._vmap_jvp and vectors.shape[0] > 1:

            def one(v: Tensor) -> Tensor:
                return torch.func.jvp(lambda *p: self._output_at(p, batch), base, tuple(self.spec.split(v)))[1]

            try:
                return torch.func.vmap(one)(vectors)
            except (RuntimeError, NotImplementedError, ValueError):
                pass
        rows = [dual(v) for v in vectors]
        if vectors.shape[0] > 1:  # vmap failed where one vector at a time works (e.g. an in-place buffer update)
            self._vmap_jvp = False
        return torch.stack(rows) if len(rows) > 1 else rows[0].unsqueeze(0)

    def _double_vjp(self, leaves: list[Tensor], out: Tensor, vectors: Tensor) -> Tensor:
        seed = torch.zeros_like(out, requires_grad=True)
        g = torch.autograd.grad(out, leaves, seed, create_graph=True, retain_graph=True, allow_unused=True)
        live = [(gi, vi) for gi, vi in zip(g, range(len(leaves)), strict=True) if gi is not None and gi.requires_grad]
        rows = []
        for v in vectors:
            parts = self.spec.split(v)
            if not live:
                rows.append(torch.zeros_like(out))
                continue
            (jv,) = torch.autograd.grad(
                [gi for gi, _ in live], seed, [parts[j] for _, j in live], retain_graph=True, allow_unused=True
            )
            rows.append(torch.zeros_like(out) if jv is None else jv)
        return torch.stack(rows)

    def _transpose_products(self, leaves: list[Tensor], out: Tensor, mu: Tensor) -> Tensor:
        """``Jᵀ u`` for each row of ``mu`` (``[k, *out.shape]``), on the kept output graph."""
        if self._batched_vjp and mu.shape[0] > 1:
            try:
                rows = grads_or_zeros(out, leaves, mu, is_grads_batched=True, retain_graph=True)
                return self.spec.flatten(rows).detach()
            except (RuntimeError, NotImplementedError):
                self._batched_vjp = False
        rows = [self.spec.flatten(grads_or_zeros(out, leaves, u, retain_graph=True)).detach() for u in mu]
        return torch.stack(rows)


@contextlib.contextmanager
def _no_mha_fastpath() -> Iterator[None]:
    """``nn.MultiheadAttention``/``TransformerEncoderLayer``'s fused inference kernels off (restored after): they
    have no derivatives, and under forward mode the tensors do not say they need any."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _check_classes(out: Tensor) -> Tensor:
    if out.dim() < 2:
        raise ValueError(
            f"`output_loss='cross_entropy'` needs the output's classes along dim 1 ([N, C, ...]), got shape "
            f"{tuple(out.shape)}."
        )
    return out


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFn | None,
    batches: Sequence[Any],
    params: ParamsArg = None,
    *,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    output_loss: str | OutputLoss | None = None,
    hvp_method: str = "auto",
    eval_mode: bool = True,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> LossOperator:
    """The operator of a curvature measurement: a :class:`LossOperator` for ``"hessian"`` (of ``loss_fn``, or of the
    split loss when ``loss_fn`` is ``None``), a :class:`CurvatureOperator` otherwise (which needs the split loss).

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> op = curvature_operator(model, None, [(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))],
        ...                         curvature="ggn", output_loss="cross_entropy")
        >>> type(op).__name__, op.size
        ('CurvatureOperator', 8)
    """
    if curvature not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}.")
    if loss_fn is not None and output_loss is not None:
        raise ValueError("pass either `loss_fn` or the split loss (`output_loss`, `output_fn`), not both.")
    if curvature == "hessian":
        if loss_fn is None:
            if output_loss is None:
                raise ValueError("`loss_fn` is None: pass a loss_fn(model, batch), or the split loss `output_loss=`.")
            if isinstance(output_loss, str) and output_loss not in OUTPUT_LOSSES:
                raise ValueError(f"`output_loss` must be one of {OUTPUT_LOSSES} or a callable, got {output_loss!r}.")
            out_fn = output_fn or default_output_fn
            of_output = _builtin_loss(output_loss) if isinstance(output_loss, str) else output_loss

            def loss_fn(m: nn.Module, batch: Any) -> Tensor:
                return of_output(out_fn(m, batch), batch)

        return LossOperator(model, loss_fn, batches, params, hvp_method=hvp_method, eval_mode=eval_mode)
    if output_loss is None:
        raise ValueError(
            f"`curvature={curvature!r}` needs the model output separated from the loss, which loss_fn(model, batch) "
            "hides: pass loss_fn=None with `output_loss='cross_entropy'`, 'mse' or a callable (output, batch) -> "
            "scalar, and `output_fn=(model, batch) -> output` when the output is not model(batch[0])."
        )
    return CurvatureOperator(
        model, batches, params, curvature=curvature, output_fn=output_fn, output_loss=output_loss,
        eval_mode=eval_mode, mc_samples=mc_samples, generator=generator,
    )  # fmt: skip
