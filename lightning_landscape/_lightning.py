"""The only module that imports Lightning by name: which package the user's objects come from.

Lightning ships as two packages with the same classes under two names: the unified ``lightning`` (its trainer in
``lightning.pytorch``, what Lightning's docs teach) and the standalone ``pytorch_lightning``. A Trainer of one
accepts only callbacks that subclass *its* ``Callback``. So:

- the callbacks are built, when constructed, as a subclass of the ``Callback`` of every Lightning package the
  process has imported (the user's choice; both if both are imported), importing one only when none is (then the
  ``pytorch_lightning`` this project depends on, or ``lightning`` if only that is installed);
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

__all__ = ["NAMESPACES", "callback_bases", "concrete_class", "imported_namespaces", "namespace_of"]

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


def concrete_class(cls: type, bases: tuple[type, ...] | None = None) -> type:
    """``cls`` made a subclass of ``bases`` (default :func:`callback_bases`): one class per combination, cached,
    with ``cls``'s name, so ``isinstance(obj, cls)`` holds and Lightning's state keys read the same."""
    if getattr(cls, "_lightning_bases", None) is not None:
        return cls  # already concrete (a copy or an unpickled object)
    bases = callback_bases() if bases is None else bases
    key = (cls, bases)
    if key not in _CONCRETE:
        concrete = type(cls.__name__, (cls, *bases), {"_lightning_bases": bases, "__module__": cls.__module__})
        concrete.__qualname__ = cls.__qualname__
        _CONCRETE[key] = concrete
    return _CONCRETE[key]


def rebuild(cls: type, bases: tuple[str, ...], state: dict[str, Any]) -> object:
    """Unpickle an object of ``concrete_class(cls)`` (``bases`` by module name, imported again if needed)."""
    modules = [sys.modules.get(name) or importlib.import_module(name) for name in bases]
    obj = object.__new__(concrete_class(cls, tuple(m.Callback for m in modules)))
    obj.__dict__.update(state)
    return obj


def module_attr(obj: object, path: str) -> Any:
    """``<namespace of obj>.<path>``, e.g. ``module_attr(trainer, "strategies.DDPStrategy")``."""
    namespace = namespace_of(obj)
    module_path, _, name = path.rpartition(".")
    module = importlib.import_module(f"{namespace.__name__}.{module_path}") if module_path else namespace
    return getattr(module, name)
