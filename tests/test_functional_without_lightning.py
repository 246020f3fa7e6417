"""The functional layer needs torch only: it imports, and computes, with Lightning made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoLightning(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric", "matplotlib"):
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, NoLightning())
    import torch
    from lightning_landscape import functional as LF

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    x = torch.randn(20, 3)
    loss_fn = lambda m, b: 0.5 * m(b).pow(2).mean()
    top = LF.hessian_eigenvalues(model, loss_fn, [x], k=1, tol=1e-8).eigenvalues[0].item()
    exact = torch.linalg.eigvalsh(x.T @ x / 20)[-1].item()
    assert abs(top - exact) < 1e-5 * exact, (top, exact)
    assert not any(m.split(".")[0] in ("pytorch_lightning", "lightning") for m in sys.modules)
    try:
        from lightning_landscape import HessianCallback  # the callbacks do need Lightning
    except ImportError as err:
        print("callbacks need Lightning:", err)
    print("ok", top)
    """
)


def test_functional_imports_and_computes_without_lightning():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout and "callbacks need Lightning" in proc.stdout
