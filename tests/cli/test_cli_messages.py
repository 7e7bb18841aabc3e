"""What a new user sees when something is off: errors that name the fix, help, version.

- no NaN temperature row unless a temperature was asked for (`evaluate`, its printed
  table, `to_dict()`, `xentjax evaluate`'s table, JSON and `--plot`), and
  `--temperature` asks for it;
- errors that name the fix: float class indices, a (logits, labels) pair passed
  as the whole data set, a negative soft label (named with its row, in one process);
- `xentjax explain --logits -3.44,1.16,3.91` (comma-separated, negatives first);
- help text for every option of `xentjax evaluate`;
- `xentjax --help` and `--version` without importing JAX.

The two error messages of the fused functions are in `test_cross_entropy_errors.py`.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xentjax
from xentjax.cli._main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _float64_temperature(z, y):
  """argmin_T of the mean cross-entropy of z / T, by SciPy on float64 (independent)."""
  from scipy.optimize import minimize_scalar
  from scipy.special import logsumexp

  z = np.asarray(z, np.float64)

  def loss(log_t):
    s = z / np.exp(log_t)
    return np.mean(logsumexp(s, axis=-1) - s[np.arange(len(y)), y])

  return float(np.exp(minimize_scalar(loss, bounds=(-5, 5), method="bounded").x))


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(21)
  labels = rng.integers(0, 6, 400)
  # An over-confident model: the label's logit raised, then everything scaled up (T ~ 2).
  logits = (4 * (rng.standard_normal((400, 6)) + 1.5 * np.eye(6)[labels])).astype(np.float32)
  np.save(tmp_path / "z.npy", logits)
  np.save(tmp_path / "y.npy", labels)
  return tmp_path, logits, labels


def _evaluate_cli(capsys, *argv):
  code = main(["evaluate", "--no-progress", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err


# --- 1. the temperature row: only when it was computed --------------------------------


def test_evaluate_has_no_temperature_unless_asked(files):
  _, z, y = files
  plain = xentjax.evaluate([(z, y)], progress=False)
  assert plain.temperature is None
  assert "temperature" not in str(plain) and "nan" not in str(plain).lower()
  assert "temperature" not in plain.to_dict()
  fitted = xentjax.evaluate([(z, y)], progress=False, temperature=True)
  np.testing.assert_allclose(fitted.temperature, _float64_temperature(z, y), rtol=1e-4)
  row = next(line for line in str(fitted).splitlines() if line.startswith("temperature"))
  np.testing.assert_allclose(float(row.split()[-1]), fitted.temperature, rtol=1e-5)
  assert fitted.to_dict()["temperature"] == fitted.temperature


def test_cli_evaluate_temperature_flag(files, capsys):
  d, z, y = files
  argv = ["--logits", d / "z.npy", "--labels", d / "y.npy"]
  code, out, err = _evaluate_cli(capsys, *argv)
  assert code == 0, err
  table = out[out.index("metric") :]  # (the file names above it hold the test's name)
  assert "temperature" not in table and "nan" not in table.lower()
  code, out, err = _evaluate_cli(capsys, *argv, "--json")
  assert code == 0, err
  assert "temperature" not in json.loads(out)
  code, out, err = _evaluate_cli(capsys, *argv, "--json", "--temperature")
  assert code == 0, err
  np.testing.assert_allclose(json.loads(out)["temperature"], _float64_temperature(z, y), rtol=1e-4)
  code, out, err = _evaluate_cli(capsys, *argv, "--temperature")
  assert code == 0, err
  assert "temperature (logits / T)" in out


def test_cli_evaluate_plot_title_names_t_only_when_fitted(files, capsys, monkeypatch):
  pytest.importorskip("matplotlib")
  from xentjax import calibration

  titles = []
  plot = calibration.ReliabilityDiagram.plot

  def spy(self, *args, **kwargs):
    titles.append(kwargs.get("title"))
    return plot(self, *args, **kwargs)

  monkeypatch.setattr(calibration.ReliabilityDiagram, "plot", spy)
  d, _, _ = files
  argv = ["--logits", d / "z.npy", "--labels", d / "y.npy", "--plot", d / "r.png"]
  assert _evaluate_cli(capsys, *argv)[0] == 0
  assert _evaluate_cli(capsys, *argv, "--temperature")[0] == 0
  assert titles[0].startswith("reliability: ECE") and "T =" not in titles[0]
  assert "T =" in titles[1] and "nan" not in titles[1]


# --- 4. errors that point the right way ------------------------------------------------


def _one_error_line(err: str) -> str:
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("xentjax evaluate: error:"), err
  return lines[0]


def test_cli_float_class_indices_hint_to_cast(files, capsys):
  d, _, y = files
  np.save(d / "yf.npy", y.astype(np.float32))
  code, out, err = _evaluate_cli(capsys, "--logits", d / "z.npy", "--labels", d / "yf.npy")
  assert code == 2 and out == ""
  line = _one_error_line(err)
  assert "cast them to integers" in line and "(400,)" in line, line
  # Soft labels of another wrong shape get no such hint (it would mislead).
  np.save(d / "ys.npy", np.full((400, 5), 0.2, np.float32))
  code, _, err = _evaluate_cli(capsys, "--logits", d / "z.npy", "--labels", d / "ys.npy")
  assert code == 2 and "integers" not in _one_error_line(err)


def test_evaluate_of_a_bare_pair_says_wrap_it_in_a_list(files):
  _, z, y = files
  with pytest.raises(
    TypeError, match=r"wrap the pair in a list: evaluate\(\[\(logits, labels\)\]\)"
  ):
    xentjax.evaluate((z, y), progress=False)
  with pytest.raises(TypeError) as e:  # anything else: no hint about pairs
    xentjax.evaluate([7], progress=False)
  assert "wrap" not in str(e.value)


def test_cli_negative_soft_label_names_its_row_not_another_process(files, capsys):
  d, z, _ = files
  soft = np.full(z.shape, 1 / 6, np.float32)
  soft[123, 0], soft[123, 1] = -0.5, 1 / 6 + 0.5  # sums to 1, one entry negative
  np.save(d / "soft.npy", soft)
  code, out, err = _evaluate_cli(capsys, "--logits", d / "z.npy", "--labels", d / "soft.npy")
  assert code == 2 and out == ""
  line = _one_error_line(err)
  assert "row [123]" in line and "negative soft label" in line, line
  assert "another process" not in line


def test_cli_nan_logits_still_name_their_row_and_cause(files, capsys):
  d, z, _ = files
  bad = z.copy()
  bad[45, 2] = np.nan
  np.save(d / "nan.npy", bad)
  code, _, err = _evaluate_cli(capsys, "--logits", d / "nan.npy", "--labels", d / "y.npy")
  line = _one_error_line(err)
  assert code == 2 and "row [45]" in line and "NaN" in line, line


def _explain_losses(capsys, *argv):
  assert main(["explain", *argv, "--label", "2"]) == 0
  out = capsys.readouterr().out
  return next(line for line in out.splitlines() if line.startswith("loss ="))


@pytest.mark.parametrize(
  "argv",
  [
    ["--logits", "-3.44,1.16,3.91"],
    ["--logits=-3.44,1.16,3.91"],
    ["--logits", "-3.44,", "1.16,", "3.91"],
    ["--logits", "-3.44", "1.16", "3.91"],
  ],
)
def test_explain_accepts_comma_separated_and_negative_logits(capsys, argv):
  z = np.array([-3.44, 1.16, 3.91])
  expected = np.logaddexp.reduce(z) - z[2]  # float64, independent of the command
  line = _explain_losses(capsys, *argv)
  assert line.endswith(f"= {expected:.4f} nats"), line


def test_explain_class_names_by_commas(capsys):
  assert (
    main(["explain", "--logits=-3.44,1.16,3.91", "--label", "panda", "--classes", "dog,cat,panda"])
    == 0
  )
  assert "p[panda]" in capsys.readouterr().out


def test_every_evaluate_option_has_help():
  parser = build_parser()
  sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
  for name, command in sub.choices.items():
    for action in command._actions:
      if action.option_strings and action.dest != "help":
        assert action.help, f"xentjax {name} {'/'.join(action.option_strings)} has no help text"
  evaluate_help = sub.choices["evaluate"].format_help()
  assert "--temperature" in evaluate_help and "progress bar" in evaluate_help


# --- 8. a fast command line: --help and --version import no JAX -----------------------


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["evaluate", "--help"]])
def test_help_and_version_do_not_import_jax(argv):
  script = (
    "import sys\n"
    "from xentjax.cli._main import main\n"
    "try:\n"
    f"  main({argv!r})\n"
    "except SystemExit as e:\n"
    "  assert e.code == 0, e.code\n"
    "heavy = sorted(m for m in ('jax', 'jaxlib', 'optax', 'chex') if m in sys.modules)\n"
    "print('HEAVY', heavy, file=sys.stderr)\n"
  )
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run(
    [sys.executable, "-c", script],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr
  assert "HEAVY []" in done.stderr, done.stderr
  assert ("usage: xentjax" in done.stdout) or done.stdout.startswith("xentjax ")


def test_import_is_lazy_and_complete():
  script = (
    "import sys, xentjax\n"
    "assert 'jax' not in sys.modules, 'import xentjax imported jax'\n"
    "missing = [n for n in xentjax.__all__ if not hasattr(xentjax, n)]\n"
    "assert not missing, missing\n"
    "assert set(xentjax.__all__) <= set(dir(xentjax))\n"
    "assert xentjax.info.__name__ == 'xentjax.info'\n"
    "from xentjax import linear_softmax_cross_entropy, grads\n"
    "try:\n"
    "  xentjax.no_such_name\n"
    "except AttributeError as e:\n"
    "  assert 'no_such_name' in str(e)\n"
    "else:\n"
    "  raise AssertionError('no AttributeError')\n"
    "print('OK')\n"
  )
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run(
    [sys.executable, "-c", script],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0 and done.stdout.strip() == "OK", done.stderr
  assert math.isfinite(
    float(xentjax.softmax_cross_entropy_with_integer_labels([[0.0, 1.0]], [1])[0])
  )


# --- 9. a suite a newcomer can wait for: the `slow` list names real tests -------------


def test_every_slow_entry_names_a_test_that_exists():
  import ast

  from conftest import SLOW, is_slow

  for entry in SLOW:
    path, _, name = entry.partition("::")
    tree = ast.parse((ROOT / path).read_text())
    tests = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert (ROOT / path).is_file() and (not name or name in tests), f"conftest.SLOW: {entry}"
  assert is_slow(
    "tests/evaluation/test_evaluate_multiprocess.py::test_library_across_two_processes"
  )
  assert is_slow(
    "tests/architecture/test_notebooks.py::test_notebook_executes_from_a_clean_kernel[01]"
  )
  assert not is_slow(
    "tests/architecture/test_notebooks.py::test_the_derivation_sequence_is_present"
  )


def test_a_shared_fixture_subprocess_runs_once_for_every_worker(tmp_path, monkeypatch):
  # Two pytest-xdist workers building the same module fixture at once: the
  # subprocess runs once, and both get its results.
  import threading
  import types

  from _harness import shared_checks

  count = tmp_path / "count"
  monkeypatch.setenv("XENTJAX_COUNT_FILE", str(count))
  monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
  (tmp_path / "gw0").mkdir()
  factory = types.SimpleNamespace(getbasetemp=lambda: tmp_path / "gw0")
  got = []
  workers = [
    threading.Thread(target=lambda: got.append(shared_checks("_counting_checks.py", factory)))
    for _ in range(2)
  ]
  for w in workers:
    w.start()
  for w in workers:
    w.join(timeout=120)
  assert got == [{"counted": "ok"}] * 2
  assert count.read_text() == "ran\n"
  # Outside pytest-xdist every call runs the script.
  monkeypatch.delenv("PYTEST_XDIST_WORKER")
  assert shared_checks("_counting_checks.py", factory) == {"counted": "ok"}
  assert count.read_text() == "ran\nran\n"
