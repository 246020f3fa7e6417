"""functional.export.save_surface: .npz and .vtk/.vtu files that read back to the same surface."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from test_trajectory import quadratic_path

from lightning_landscape.functional.export import save_surface
from lightning_landscape.functional.surface import loss_surface
from lightning_landscape.functional.trajectory import trajectory_pca, trajectory_surface

meshio = pytest.importorskip("meshio")


def _slice():
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = loss_surface(model, lambda m, b: m(b).pow(2).mean(), [x], steps=5, generator=torch.Generator().manual_seed(1))
    s.losses[0, 0] = math.nan  # a divergent corner
    return s


def _trajectory():
    """The plane of a quadratic's gradient-descent path, loss ½θᵀAθ, on a 2-parameter 'model'."""
    path = quadratic_path(8)
    model = torch.nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(path[-1].reshape(1, 2))
    a = torch.tensor([[3.0, 1.0], [1.0, 0.5]], dtype=torch.float64)

    def loss_fn(m, _):
        w = m.weight.reshape(-1)
        return 0.5 * w @ a @ w

    plane = trajectory_pca(path, path[-1])
    return trajectory_surface(model, loss_fn, [torch.zeros(1)], plane, steps=6, margin=0.1)


def test_npz_round_trip(tmp_path):
    s = _slice()
    data = np.load(save_surface(s, tmp_path / "slice.npz", include_directions=True))
    np.testing.assert_array_equal(data["x"], s.coords.numpy())
    np.testing.assert_array_equal(data["y"], s.coords.numpy())
    np.testing.assert_array_equal(data["losses"], s.losses.numpy())  # NaN where it was NaN
    assert str(data["kind"]) == "slice" and int(data["numel"]) == 4
    np.testing.assert_allclose(data["direction_norms"], s.directions.double().norm(dim=1).numpy(), rtol=1e-12)
    np.testing.assert_array_equal(data["directions"], s.directions.numpy())

    t = _trajectory()
    data = np.load(save_surface(t, tmp_path / "plane.npz"))
    assert str(data["kind"]) == "trajectory" and "directions" not in data
    np.testing.assert_array_equal(data["losses"], t.losses.numpy())
    np.testing.assert_array_equal(data["path"], t.plane.coords.numpy())
    assert data["path_steps"].tolist() == list(range(9)) and bool(data["centered"])
    np.testing.assert_allclose(data["direction_norms"], [1.0, 1.0], atol=1e-12)  # PCA directions: unit vectors


@pytest.mark.parametrize("ext", [".vtk", ".vtu"])
def test_vtk_surfaces_read_back(tmp_path, ext):
    s = _slice()
    mesh = meshio.read(save_surface(s, tmp_path / f"slice{ext}"))
    assert mesh.points.shape == (25, 3)
    np.testing.assert_allclose(mesh.points[:, 2].reshape(5, 5)[1:, 1:], np.log10(s.losses.numpy())[1:, 1:],
                               rtol=1e-12)  # fmt: skip
    np.testing.assert_array_equal(mesh.point_data["loss"].reshape(5, 5), s.losses.numpy())
    assert mesh.cells_dict["quad"].shape == (15, 4)  # 16 cells less the one at the NaN corner

    t = _trajectory()
    mesh = meshio.read(save_surface(t, tmp_path / f"plane{ext}", height="loss"))
    assert mesh.points.shape == (36 + 9, 3) and mesh.cells_dict["quad"].shape == (25, 4)
    assert mesh.cells_dict["line"].shape == (8, 2)
    np.testing.assert_allclose(mesh.points[:36, 2].reshape(6, 6), t.losses.numpy(), rtol=1e-12)
    assert mesh.point_data["step"][36:].tolist() == list(range(9))
    # the path's last point is the plane's centre, at the quadratic's loss there (bilinear on a fine grid: 5%)
    theta = quadratic_path(8)[-1]
    exact = 0.5 * float(theta @ torch.tensor([[3.0, 1.0], [1.0, 0.5]], dtype=torch.float64) @ theta)
    assert mesh.point_data["loss"][-1] == pytest.approx(exact, rel=0.05)


def test_bad_input_and_missing_meshio(tmp_path, monkeypatch):
    s = _slice()
    with pytest.raises(ValueError, match="`path`"):
        save_surface(s, tmp_path / "slice.csv")
    with pytest.raises(ValueError, match="`height`"):
        save_surface(s, tmp_path / "slice.vtk", height="cubic")
    with pytest.raises(TypeError, match="`result`"):
        save_surface(s.losses, tmp_path / "slice.npz")
    monkeypatch.setitem(sys.modules, "meshio", None)
    with pytest.raises(ImportError, match="pip install meshio"):
        save_surface(s, tmp_path / "slice.vtu")
