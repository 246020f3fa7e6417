"""functional.trajectory: snapshot store, PCA through the Gram matrix, the plane's loss grid, against dense numpy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import cross_entropy, digits, digits_mlp
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from lightning_landscape.functional.trajectory import (
    SnapshotStore,
    plane_grid,
    trajectory_pca,
    trajectory_surface,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_pca(snapshots: list[torch.Tensor], center: torch.Tensor, centered: bool = True):
    """The reference: a dense SVD of the stacked differences, with trajectory_pca's sign rule."""
    d = np.stack([s.double().numpy() for s in snapshots]) - center.double().numpy()
    m = d - d.mean(axis=0) if centered else d
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    dirs = vt[:2]
    coords = d @ dirs.T
    for k in range(2):
        if coords[np.argmax(np.abs(coords[:, k])), k] > 0:
            dirs[k], coords[:, k] = -dirs[k], -coords[:, k]
    return dirs, coords, s[:2] ** 2 / np.sum(s**2)


def quadratic_path(steps: int = 12) -> list[torch.Tensor]:
    """Gradient descent on ½θᵀAθ with an ill-conditioned A: a curved path into the minimum (float64)."""
    a = torch.tensor([[3.0, 1.0], [1.0, 0.5]], dtype=torch.float64)
    theta = torch.tensor([2.0, -3.0], dtype=torch.float64)
    path = [theta.clone()]
    for _ in range(steps):
        theta = theta - 0.25 * (a @ theta)
        path.append(theta.clone())
    return path


def mlp_path(steps: int = 10, hidden: int = 8):
    """Float32 SGD snapshots of a small digits MLP, and the trained model."""
    model = digits_mlp(hidden=hidden)
    x, y = digits(128)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    path = [parameters_to_vector(model.parameters()).detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        cross_entropy(model, (x, y)).backward()
        opt.step()
        path.append(parameters_to_vector(model.parameters()).detach().clone())
    return model, (x, y), path


# Tolerances: both sides compute in float64 from the same float32/float64 values; they differ only by rounding in
# different orders of summation (Gram eigenproblem vs SVD), ~1e-12 relative, so 1e-6 leaves ample room.
def _assert_matches(plane, snapshots, center, centered=True):
    dirs, coords, ratio = numpy_pca(snapshots, center, centered)
    np.testing.assert_allclose(plane.directions.numpy(), dirs, atol=1e-6)
    np.testing.assert_allclose(plane.coords.numpy(), coords, atol=1e-6 * np.abs(coords).max())
    np.testing.assert_allclose(plane.explained_variance.numpy(), ratio, atol=1e-6)
    gram = plane.directions @ plane.directions.T
    torch.testing.assert_close(gram, torch.eye(2, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("centered", [True, False])
def test_quadratic_pca_equals_dense_numpy(tmp_path, centered):
    path = quadratic_path()
    store = SnapshotStore(tmp_path)
    for i, theta in enumerate(path):
        store.add(theta, step=i)
    center = path[-1]
    plane = trajectory_pca(store, center, centered=centered, chunk=3)
    _assert_matches(plane, path, center, centered)
    assert plane.steps == list(range(len(path)))
    # two parameters: the plane is the whole space
    assert plane.explained_variance.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the same from tensors in memory, and from a centre that is not a snapshot
    _assert_matches(trajectory_pca(path, center, centered=centered), path, center, centered)
    other = torch.tensor([0.3, -0.1], dtype=torch.float64)
    _assert_matches(trajectory_pca(store, other, centered=centered), path, other, centered)


def test_mlp_pca_equals_dense_numpy_and_the_gram_cache_extends(tmp_path):
    model, _, path = mlp_path(steps=12)
    center = parameters_to_vector(model.parameters()).detach()
    store = SnapshotStore(tmp_path)
    for i, theta in enumerate(path[:6]):
        store.add(theta, step=10 * i)
    first = trajectory_pca(store, path[5], chunk=2)
    _assert_matches(first, path[:6], path[5])
    assert store.gram_size == 6
    for i, theta in enumerate(path[6:], start=6):  # more snapshots later: only their rows are computed
        store.add(theta, step=10 * i)
    plane = trajectory_pca(store, center, chunk=4)
    _assert_matches(plane, path, center)
    assert plane.steps == [10 * i for i in range(13)]
    assert 0.5 < plane.explained_variance.sum().item() <= 1.0
    # thinning keeps the first and every other snapshot, and the cached Gram matrix's rows for them
    dropped = store.thin()
    assert len(store) == 7 and len(dropped) == 6 and store.steps == [20 * i for i in range(7)]
    _assert_matches(trajectory_pca(store, center), path[::2], center)


def test_store_state_dict_and_files(tmp_path):
    _, _, path = mlp_path(steps=4)
    store = SnapshotStore(tmp_path / "a")
    for i, theta in enumerate(path):
        store.add(theta, step=i)
    assert all(p.startswith(str(tmp_path / "a")) for p in store.paths)
    assert torch.equal(torch.load(store.paths[3]), path[3])  # the parameters' dtype: stored exactly
    trajectory_pca(store, path[-1])
    twin = SnapshotStore(tmp_path / "a")
    twin.load_state_dict(copy.deepcopy(store.state_dict()))
    assert twin.paths == store.paths and twin.steps == store.steps and torch.equal(twin.gram, store.gram)
    assert torch.equal(twin.difference(2), path[2].double() - path[0].double())


def test_half_precision_snapshots_are_differences_to_the_first(tmp_path):
    _, _, path = mlp_path(steps=12)
    exact = trajectory_pca(path, path[-1])
    for dtype, unit in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)):
        store = SnapshotStore(tmp_path / str(dtype), dtype=dtype)
        for i, theta in enumerate(path):
            store.add(theta, step=i)
        assert torch.load(store.paths[0]).dtype == torch.float32 and torch.load(store.paths[1]).dtype == dtype
        assert store.bytes_per_snapshot(100, torch.float32) == 200
        for i in (1, 6, 12):  # the rounding error is relative to how far the weights moved, not to the weights
            moved = path[i].double() - path[0].double()
            error = (store.difference(i) - moved).abs()
            assert bool((error <= unit * moved.abs() + 6e-8).all()), dtype
        plane = trajectory_pca(store, path[-1])
        # what it costs: the directions and coordinates move by about the rounding unit
        cos = (plane.directions * exact.directions).sum(dim=1)
        assert bool((cos > 1 - 10 * unit).all()), (dtype, cos)
        assert (plane.coords - exact.coords).abs().max() < 10 * unit * exact.coords.abs().max()


def test_plane_loss_grid_equals_direct_evaluation():
    model, (x, y), path = mlp_path(steps=8)
    model = model.double()
    batches = [(x[:64].double(), y[:64]), (x[64:100].double(), y[64:100])]
    center = parameters_to_vector(model.parameters()).detach()
    plane = trajectory_pca([p.double() for p in path], center)
    surface = trajectory_surface(model, cross_entropy, batches, plane, steps=4, margin=0.25)
    x_ref, y_ref = plane_grid(plane.coords, 4, 0.25)
    assert torch.equal(surface.x, x_ref) and torch.equal(surface.y, y_ref)
    # the grid spans the path and the centre, with a quarter of the span beyond them
    span = max(plane.coords[:, 0].max().item(), 0.0) - plane.coords[:, 0].min().item()
    assert surface.x[0].item() == pytest.approx(plane.coords[:, 0].min().item() - 0.25 * span)
    probe = copy.deepcopy(model)
    for i, a in enumerate(surface.x.tolist()):
        for j, b in enumerate(surface.y.tolist()):
            vector_to_parameters(center + a * plane.directions[0] + b * plane.directions[1], probe.parameters())
            with torch.no_grad():
                direct = sum(len(t) * cross_entropy(probe, (s, t)).item() for s, t in batches) / 100
            # float64 model: the grid forms θ + a·v1 + b·v2 in another order of operations, ~1e-15 relative
            assert surface.losses[i, j].item() == pytest.approx(direct, rel=1e-10)
    assert torch.equal(parameters_to_vector(model.parameters()), center)  # never written


def test_bad_input_names_the_argument(tmp_path):
    path = quadratic_path(3)
    with pytest.raises(ValueError, match="`snapshots`"):
        trajectory_pca(path[:2], path[-1])
    with pytest.raises(ValueError, match="`center`"):
        trajectory_pca(path, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`chunk`"):
        trajectory_pca(path, path[-1], chunk=0)
    line = [torch.tensor([float(i), 2.0 * i]) for i in range(4)]  # a straight path: no second direction
    with pytest.raises(ValueError, match="fewer than two dimensions"):
        trajectory_pca(line, line[-1])
    with pytest.raises(ValueError, match="`steps`"):
        plane_grid(torch.zeros(3, 2), steps=1, margin=0.1)
    with pytest.raises(ValueError, match="`margin`"):
        plane_grid(torch.zeros(3, 2), steps=5, margin=-1.0)
    with pytest.raises(ValueError, match="`dtype`"):
        SnapshotStore(tmp_path, dtype=torch.int8)
    store = SnapshotStore(tmp_path)
    store.add(torch.zeros(3), step=0)
    with pytest.raises(ValueError, match="`vector`"):
        store.add(torch.zeros(4), step=1)
    model = torch.nn.Linear(2, 1)
    plane = trajectory_pca(path, path[-1])
    with pytest.raises(ValueError, match="`plane`"):
        trajectory_surface(model, lambda m, b: m(b).sum(), [torch.ones(1, 2)], plane)
