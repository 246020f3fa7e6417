"""``examples/sam_variants.py --fast``: its table prints the numbers it returns, its reading follows from them, and
each variant really ran its configuration (seen by spies on SAMMixin's ascent step and LookSAM's reuse, and by
the example's own step counts)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from collections import defaultdict
from pathlib import Path

import pytest

import lightning_landscape._sam_variants as sam_variants_module
import lightning_landscape.sam as sam_module

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def load(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # it imports quickstart and device_modeling, as a script would
    spec = importlib.util.spec_from_file_location("example_sam_variants", EXAMPLES / "sam_variants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def number(text: str) -> float:
    return float(text.replace("x", "").replace("–", "nan"))


@pytest.fixture(scope="module")
def fast_run():
    """One ``--fast`` run (2 seeds, both tasks, all variants) with spies: (module, results, printed, seen)."""
    mp = pytest.MonkeyPatch()
    try:
        module = load(mp)
        seen: dict[tuple, dict] = defaultdict(lambda: {"ascents": [], "reuses": 0})
        current: list[tuple] = []

        def tracked(run):
            def wrapper(variant, seed, *args):
                current.append((run.__name__.removeprefix("run_"), variant, seed))
                try:
                    return run(variant, seed, *args)
                finally:
                    current.pop()

            return wrapper

        mp.setattr(module, "run_digits", tracked(module.run_digits))
        mp.setattr(module, "run_device", tracked(module.run_device))
        ascent, apply = sam_module.ascent_step, sam_variants_module.Reuse.apply

        def spy_ascent(grads, weights, rho, **kwargs):
            if current:  # the patch lives as long as this module's tests; only the tracked runs are recorded
                seen[current[-1]]["ascents"].append((len(grads), rho, kwargs.get("adaptive", False)))
            return ascent(grads, weights, rho, **kwargs)

        def spy_apply(self, params, alpha):
            if current:
                seen[current[-1]]["reuses"] += 1
            return apply(self, params, alpha)

        mp.setattr(sam_module, "ascent_step", spy_ascent)
        mp.setattr(sam_variants_module.Reuse, "apply", spy_apply)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            results = module.main(["--fast"])
        yield module, results, out.getvalue(), dict(seen)
    finally:
        mp.undo()


def table_rows(printed: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in printed.splitlines():
        if line.startswith("| ") and not line.startswith("| task"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def test_table_prints_the_returned_numbers(fast_run):
    module, results, printed, _ = fast_run
    rows = table_rows(printed)
    assert sorted(rows) == sorted((t, v) for t in module.TASKS for v in module.VARIANTS)
    for (task, variant), cells in rows.items():
        p = f"{task}/{variant}/"
        rho, error, eig, worst, counts, seconds, ratio = cells
        expected_rho = {"plain": None, "asam": 10 * 0.05}.get(variant, 0.05) if task == "digits" else None
        if task == "device":
            expected_rho = {"plain": None, "asam": 10 * 0.01}.get(variant, 0.01)
        assert (rho == "–") if expected_rho is None else number(rho) == pytest.approx(expected_rho)
        # each printed number equals the returned one to the printed precision (half a unit of the last digit,
        # 3 significant digits: a relative 5e-3)
        mean, std = (number(s) for s in error.split(" ± "))
        assert mean == pytest.approx(results[p + "test_error_mean"], abs=5e-5)
        assert std == pytest.approx(results[p + "test_error_std"], abs=5e-5)
        mean, std = (number(s) for s in eig.split(" ± "))
        assert mean == pytest.approx(results[p + "eigenvalue_1_mean"], rel=5e-3)
        assert std == pytest.approx(results[p + "eigenvalue_1_std"], rel=5e-2, abs=1e-12)
        mean, std = (number(s) for s in worst.split(" ± "))
        assert mean == pytest.approx(results[p + "worst_case_mean"], rel=5e-3)
        sam_steps, steps = (number(s) for s in counts.split(" / "))
        assert (sam_steps, steps) == (results[p + "sam_steps"], results[p + "steps"])
        assert number(seconds) == pytest.approx(results[p + "seconds_mean"], abs=5e-3)
        assert number(ratio) == pytest.approx(results[p + "step_ratio"], abs=5e-3)
        assert results[p + "worst_case_mean"] >= 0  # a maximum over a ball holding δ = 0
    assert all(results[f"{t}/plain/step_ratio"] == 1.0 for t in module.TASKS)


def test_reading_follows_from_the_numbers(fast_run):
    module, results, printed, _ = fast_run
    text = printed.split("Reading (")[1]
    for task in module.TASKS:
        block = text.split(f"{task} (plain:")[1].split("\n", 1)[1]
        groups = {"better": [], "worse": [], "within": []}
        for variant in module.VARIANTS[1:]:
            p, q = f"{task}/plain/", f"{task}/{variant}/"
            diff = results[q + "test_error_mean"] - results[p + "test_error_mean"]
            spread = max(results[q + "test_error_std"], results[p + "test_error_std"])
            kind = "within" if abs(diff) <= spread else ("better" if diff < 0 else "worse")
            groups[kind].append(variant)
            line = next(ln for ln in block.splitlines() if ln.startswith(f"- {variant}: "))
            words = {"better": "beats plain", "worse": "WORSE than plain", "within": "does not help here"}
            assert line.startswith(f"- {variant}: {words[kind]}"), line
            assert f"test error {diff:+.4f} vs spread {spread:.4f}" in line, line
            assert f"{results[q + 'step_ratio']:.2f}x plain's step time" in line
        for label, kind in (("Beat plain", "better"), ("Worse than plain", "worse"), ("Within the spread", "within")):
            listed = re.search(rf"  {label}: (.*)\.\n", block).group(1)
            assert listed == (", ".join(groups[kind]) or "none"), (label, listed)
    # the same function, on numbers chosen to land in each class, and with one seed
    r = {f"t/{v}/{k}": 0.0 for v in ("plain", "sam", "asam", "every5") for k in ("test_error_std", "eigenvalue_1_std")}
    r.update({"t/plain/test_error_mean": 0.10, "t/plain/test_error_std": 0.01, "t/sam/test_error_mean": 0.08})
    r.update({"t/asam/test_error_mean": 0.12, "t/every5/test_error_mean": 0.105, "t/every5/test_error_std": 0.02})
    r.update({f"t/{v}/eigenvalue_1_mean": 1.0 for v in ("plain", "sam", "asam", "every5")})
    r.update({f"t/{v}/step_ratio": 1.0 for v in ("plain", "sam", "asam", "every5")})
    lines = module.reading(r, ["t"], ["plain", "sam", "asam", "every5"], seeds=3)
    assert lines[-3:] == ["  Beat plain: sam.", "  Worse than plain: asam.", "  Within the spread: every5."]
    lines = module.reading(r, ["t"], ["plain", "sam"], seeds=1)
    assert "not judged (one seed, no spread)" in lines[1]


def test_each_variant_ran_its_configuration(fast_run):
    """Counted, not assumed: the ascent steps SAMMixin took (and with what ρ, ASAM or not, over how many
    parameters), LookSAM's reuse on plain steps, and the example's own SAM-step counts."""
    module, results, _, seen = fast_run
    rhos = {"digits": 0.05, "device": 0.01}
    for task in module.TASKS:
        steps = int(results[f"{task}/plain/steps"])
        n_params = int(results[f"{task}/plain/parameters"])
        every5 = [s for s in range(steps) if (s + 1) % 5 == 0]
        reused = [s for s in range(steps) if s > every5[0] and (s + 1) % 5 != 0]
        for variant in module.VARIANTS:
            want_steps = {"plain": 0, "every5": len(every5), "looksam": len(every5)}.get(variant, steps)
            assert results[f"{task}/{variant}/sam_steps"] == want_steps, (task, variant)
            for seed in (0, 1):
                run = seen.get((task, variant, seed), {"ascents": [], "reuses": 0})
                assert len(run["ascents"]) == want_steps, (task, variant, seed)
                rho = rhos[task] * (10 if variant == "asam" else 1)
                perturbed = 4 if variant == "samon" else n_params  # two norm layers' weight and bias
                for n, r, adaptive in run["ascents"]:
                    assert (n, adaptive) == (perturbed, variant == "asam") and r == pytest.approx(rho), run["ascents"]
                assert run["reuses"] == (len(reused) if variant == "looksam" else 0), (task, variant, seed)
        # SAM-ON's first pass computed the norm layers' gradients only; SAM's, every parameter's
        assert results[f"{task}/samon/first_pass_grads"] == 4
        assert results[f"{task}/sam/first_pass_grads"] == n_params


def test_bad_arguments_are_refused(monkeypatch, capsys):
    module = load(monkeypatch)
    with pytest.raises(ValueError, match="`variant` must be one of"):
        module.variant_settings("adam", 0.05)
    for argv in (["--tasks", "cifar"], ["--variants", "sam,sam"], ["--seeds", "0"]):
        with pytest.raises(SystemExit):
            module.main(argv)
    assert "--tasks takes each of" in capsys.readouterr().err


def test_rho_sweep_reads_the_first_order_regime(monkeypatch, capsys):
    """``--rho-sweep``: at a tiny ρ the logged sharpness is the first-order rise ρ·‖g‖ (ratio 1 up to the
    curvature term ½ρ²·ĝᵀHĝ, here a relative ~1e-4), at a large ρ clearly more; printed as returned."""
    module = load(monkeypatch)
    results = module.main(["--fast", "--rho-sweep", "0.0001,0.5"])
    for when in ("first_epoch", "last_epoch"):
        assert results[f"0.0001/first_order_ratio_{when}"] == pytest.approx(1.0, abs=0.01)
        assert results[f"0.5/first_order_ratio_{when}"] > 1.1
    assert results["0.5/sharpness_over_loss_last_epoch"] > 10 * results["0.0001/sharpness_over_loss_last_epoch"]
    printed = capsys.readouterr().out
    for rho in ("0.0001", "0.5"):
        row = next(ln for ln in printed.splitlines() if ln.startswith(f"| {rho} |"))
        cells = [number(c) for c in row.strip("|").split("|")[1:]]
        keys = ["first_order_ratio_first_epoch", "first_order_ratio_last_epoch", "loss_last_epoch",
                "sharpness_over_loss_last_epoch"]  # fmt: skip
        want = [results[f"{rho}/{k}"] for k in keys] + [results[f"{rho}/test_error"]]
        assert cells == pytest.approx(want, abs=5e-4)
    with pytest.raises(SystemExit):
        module.main(["--rho-sweep", "small"])
