"""tools/scaling.py: the Chinchilla fit recovers published laws from synthetic points, the
compute-optimal allocation matches a numerical minimum, and the CLI refuses what cannot work.
Fast: nothing here trains."""

import csv
import importlib.util
import json

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from conftest import REPO

spec = importlib.util.spec_from_file_location("scaling", REPO / "tools" / "scaling.py")
scaling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(scaling)

# Hoffmann et al. 2022 (approach 3) and Besiroglu et al. 2024 (Epoch AI's replication).
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
CHINCHILLA_FLOPS = 5.76e23  # Chinchilla's own training budget


def synthetic(theta, noise=0.0, seed=0):
  """A 7 × 7 grid, N 1e7…1e10 × D 1e9…1e12, losses × exp(noise · standard normal)."""
  n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 7), np.geomspace(1e9, 1e12, 7)))
  rng = np.random.default_rng(seed)
  return n, d, scaling.law(theta, n, d) * np.exp(noise * rng.standard_normal(n.size))


@pytest.mark.parametrize("theta", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
def test_fit_recovers_published_laws(theta):
  fit = scaling.fit(*synthetic(theta), starts=8)  # exact points: the fit is the law
  for name in scaling.NAMES:
    np.testing.assert_allclose(fit[name], theta[name], rtol=1e-3, err_msg=name)
  fit = scaling.fit(*synthetic(theta, noise=0.002, seed=1), starts=8)  # 0.2% noise
  assert abs(fit["E"] - theta["E"]) < 0.02
  assert abs(fit["alpha"] - theta["alpha"]) < 0.02 and abs(fit["beta"] - theta["beta"]) < 0.02
  for name in ("A", "B"):  # the coefficients trade off against the exponents: loose
    assert abs(np.log(fit[name] / theta[name])) < 0.25, (name, fit[name])
  n_opt, _ = scaling.compute_optimal(fit, CHINCHILLA_FLOPS)
  true_n_opt, _ = scaling.compute_optimal(theta, CHINCHILLA_FLOPS)
  assert abs(np.log(n_opt / true_n_opt)) < 0.15


@pytest.mark.parametrize("theta", [CHINCHILLA, EPOCH], ids=["chinchilla", "epoch"])
@pytest.mark.parametrize("flops", [1e19, CHINCHILLA_FLOPS, 1e26])
def test_compute_optimal_closed_form_is_the_iso_flop_minimum(theta, flops):
  n_opt, d_opt = scaling.compute_optimal(theta, flops)
  np.testing.assert_allclose(6 * n_opt * d_opt, flops, rtol=1e-9)
  best = minimize_scalar(lambda log_n: scaling.law(theta, np.exp(log_n), flops / 6 /
                                                   np.exp(log_n)),
                         bounds=(np.log(1e3), np.log(1e15)), method="bounded",
                         options={"xatol": 1e-9})
  np.testing.assert_allclose(np.exp(best.x), n_opt, rtol=1e-3)


def test_chinchilla_allocation_at_its_own_budget():
  n_opt, d_opt = scaling.compute_optimal(CHINCHILLA, CHINCHILLA_FLOPS)
  assert 3e10 < n_opt < 7e10 and 1e12 < d_opt < 4e12  # ~3.2e10 params, ~3.0e12 tokens
  n_opt, d_opt = scaling.compute_optimal(EPOCH, CHINCHILLA_FLOPS)
  assert 5e10 < n_opt < 1e11 and 1e12 < d_opt < 2e12  # Epoch: ~20 tokens per parameter
  assert 15 < d_opt / n_opt < 25


def test_bootstrap_intervals_cover_the_truth():
  n, d, loss = synthetic(CHINCHILLA, noise=0.002, seed=2)
  fit = scaling.fit(n, d, loss, starts=8)
  intervals = scaling.bootstrap(n, d, loss, fit, samples=8, budgets=[CHINCHILLA_FLOPS],
                                starts=1)
  assert intervals["samples"] == 8
  for name in ("E", "alpha", "beta"):
    lo, hi = intervals[name]
    assert lo <= fit[name] <= hi and hi - lo < 0.05, (name, lo, hi)
  lo, hi = intervals[f"N_opt@{CHINCHILLA_FLOPS:g}"]
  assert lo < scaling.compute_optimal(fit, CHINCHILLA_FLOPS)[0] < hi


def test_fit_command_writes_report_and_plot(tmp_path, capsys):
  n, d, loss = synthetic(EPOCH, noise=0.002)
  results = tmp_path / "results.csv"
  scaling.write_results(results, [{"params": a, "tokens": b, "loss": c, "width": 1}
                                  for a, b, c in zip(n, d, loss)])
  code = scaling.main(["fit", str(results), "--bootstrap", "3", "--starts", "8", "--budget",
                       "1e21,5.76e23", "--plot", str(tmp_path / "fit.png"), "--out",
                       str(tmp_path / "fit.json")])
  assert code == 0
  report = json.loads((tmp_path / "fit.json").read_text())
  assert report["points"] == 49 and abs(report["fit"]["alpha"] - EPOCH["alpha"]) < 0.02
  assert [c["flops"] for c in report["compute_optimal"]] == [1e21, 5.76e23]
  assert len(report["compute_optimal"][1]["N_opt_interval"]) == 2
  png = (tmp_path / "fit.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  assert "N_opt" in capsys.readouterr().out
  # The JSON form of the results file reads the same.
  (tmp_path / "results.json").write_text(json.dumps(
      [{"params": a, "tokens": b, "loss": c} for a, b, c in zip(n, d, loss)]))
  np.testing.assert_allclose(scaling.read_results(tmp_path / "results.json")[2], loss)


def fails(capsys, *argv) -> str:
  capsys.readouterr()
  assert scaling.main([str(a) for a in argv]) == 1
  out, err = capsys.readouterr()
  assert not out and err.startswith("error: ") and err.count("\n") == 1, (out, err)
  return err


def test_run_refuses_a_grid_smaller_than_the_law(capsys, tmp_path):
  err = fails(capsys, "run", "--widths", "32,64", "--tokens", "1e5,2e5", "--workdir", tmp_path)
  assert "4 runs, fewer than the law's 5 parameters" in err
  assert not list(tmp_path.iterdir())  # nothing trained
  assert "multiple of --head_dim" in fails(capsys, "run", "--widths", "24,32,48", "--tokens",
                                           "1e5,2e5", "--workdir", tmp_path)


def test_fit_refuses_too_few_points_and_bad_files(capsys, tmp_path):
  path = tmp_path / "r.csv"
  with path.open("w", newline="") as f:
    writer = csv.writer(f)
    writer.writerows([["params", "tokens", "loss"], [1e6, 1e8, 3.0], [2e6, 1e8, 2.9],
                      [1e6, 2e8, 2.8], [2e6, 2e8, 2.7]])
  assert "4 points cannot determine the law's 5 parameters" in fails(capsys, "fit", path)
  path.write_text("params,tokens\n1,2\n")
  assert "columns params, tokens and loss" in fails(capsys, "fit", path)
  assert "no such file" in fails(capsys, "fit", tmp_path / "missing.csv")
