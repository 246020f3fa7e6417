"""The only module that imports Lightning by name: which package the user's objects come from.

Lightning ships as two packages with the same classes under two names: the unified ``lightning`` (its trainer in
``lightning.pytorch``, what Lightning's docs teach) and the standalone ``pytorch_lightning``. A Trainer of one
accepts only callbacks that subclass *its* ``Callback``. So:

- the callbacks subclass the ``Callback`` of every Lightning package the process has imported when
  ``lightning_landscape``'s callbacks are first used (the user's choice; both if both are imported), importing one
  only when none is (then the ``pytorch_lightning`` this project depends on, or ``lightning`` if only that is
  installed); a package imported later is added per instance (:func:`concrete_class`), so its Trainer accepts
  them too (LightningCLI's class-path check, done on the class, sees the packages imported at first use);
- ``SAMMixin`` subclasses neither: it is a plain mixin placed before the user's ``LightningModule``, and reads the
  classes it needs from the package that module's class comes from (:func:`namespace_of`);
- loggers are recognised by class name (``TensorBoardLogger``, ``WandbLogger``, …), so either package's work.

Example:
    >>> import pytorch_lightning
    >>> namespace_of(pytorch_lightning.Trainer(logger=False, enable_progress_bar=False)).__name__
    'pytorch_lightning'
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

__all__ = ["NAMESPACES", "callback_bases", "concrete_class", "imported_namespaces", "namespace_of", "public_class"]

#: type hints for either package's classes (a real class would tie a signature to one package, and tools that
#: resolve hints, such as LightningCLI's jsonargparse, would import it)
Trainer = Any
LightningModule = Any

#: the two names of Lightning's PyTorch package, the unified one first
NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
_CONCRETE: dict[tuple[type, tuple[type, ...]], type] = {}


def imported_namespaces() -> list[ModuleType]:
    """The Lightning packages this process has imported (the user's choice), in :data:`NAMESPACES` order."""
    return [sys.modules[name] for name in NAMESPACES if name in sys.modules]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def default_namespace() -> ModuleType:
    """The namespace to use when the user has imported none: ``pytorch_lightning`` if installed, else ``lightning``."""
    imported = imported_namespaces()
    if imported:
        return imported[0]
    for name in reversed(NAMESPACES):
        if _installed(name):
            return importlib.import_module(name)
    raise ImportError("lightning-landscape needs `pytorch_lightning` or `lightning`: pip install pytorch-lightning")


def namespace_of(obj: object) -> ModuleType:
    """The Lightning package ``obj``'s class (or the first Lightning class in its MRO) comes from."""
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in cls.__mro__:
        module = klass.__module__ or ""
        for name in NAMESPACES:
            if module == name or module.startswith(name + "."):
                return sys.modules[name] if name in sys.modules else importlib.import_module(name)
    return default_namespace()


def callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of every imported Lightning package (importing the default one if none is)."""
    namespaces = imported_namespaces() or [default_namespace()]
    return tuple(ns.Callback for ns in namespaces)


def concrete_class(cls: type) -> type:
    """``cls``, or (when a Lightning package was imported after ``cls`` was defined) a subclass of it that also
    subclasses that package's ``Callback``: one class per combination, cached, with ``cls``'s name, so
    ``isinstance(obj, cls)`` holds and Lightning's state keys read the same."""
    missing = tuple(base for base in callback_bases() if not issubclass(cls, base))
    if not missing:
        return cls
    key = (cls, missing)
    if key not in _CONCRETE:
        concrete = type(cls.__name__, (cls, *missing), {"__module__": cls.__module__})
        concrete.__qualname__ = cls.__qualname__
        _CONCRETE[key] = concrete
    return _CONCRETE[key]


def public_class(obj: object) -> type:
    """The class ``obj`` was built as (``concrete_class``'s argument), for pickling by reference."""
    for klass in type(obj).__mro__:
        if klass not in _CONCRETE.values():
            return klass
    return type(obj)


def rebuild(cls: type, state: dict[str, Any]) -> object:
    """Unpickle an object of ``concrete_class(cls)`` with ``state`` as its ``__dict__``."""
    obj = object.__new__(concrete_class(cls))
    obj.__dict__.update(state)
    return obj


def module_attr(obj: object, path: str) -> Any:
    """``<namespace of obj>.<path>``, e.g. ``module_attr(trainer, "strategies.DDPStrategy")``."""
    namespace = namespace_of(obj)
    module_path, _, name = path.rpartition(".")
    module = importlib.import_module(f"{namespace.__name__}.{module_path}") if module_path else namespace
    return getattr(module, name)


#: strategies whose parameters the plugin cannot see as FSDP2 DTensor shards, and why
UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "FSDP1 flattens parameters into FlatParameters; use ModelParallelStrategy (FSDP2, `fully_shard` "
    "in `configure_model`), which the plugin measures shard by shard",
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and gradients outside PyTorch's view; use "
    "ModelParallelStrategy (FSDP2) or DDP",
    "XLAStrategy": "XLA's lazy tensors are not supported",
    "SingleDeviceXLAStrategy": "XLA's lazy tensors are not supported",
}


def check_strategy(owner: str, strategy: Any) -> None:
    """Raise a ``RuntimeError`` naming ``owner`` for a strategy the plugin cannot measure under: DeepSpeed, XLA,
    FSDP1, and ``ModelParallelStrategy`` with tensor parallelism (FSDP2's data-parallel sharding is measured)."""
    name = type(strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise RuntimeError(f"{owner} does not support {name}: {UNSUPPORTED_STRATEGIES[name]}.")
    if name == "ModelParallelStrategy":
        mesh = getattr(strategy, "device_mesh", None) if getattr(strategy, "_device_mesh", None) is not None else None
        tp = mesh["tensor_parallel"].size() if mesh is not None else getattr(strategy, "_tensor_parallel_size", 1)
        if tp != 1:
            raise RuntimeError(
                f"{owner} supports ModelParallelStrategy with data-parallel (FSDP2) sharding only; this one has "
                f"tensor_parallel_size={tp}. Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) "
                "(Lightning's 'auto' gives every device to tensor parallelism)."
            )
