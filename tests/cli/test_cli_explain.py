"""Tests for `xentjax explain`.

The printed numbers are checked against float64 NumPy computed here, not
against the command's own output.
"""

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from xentjax.cli._main import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(capsys, *argv):
  rc = main(["explain", *argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _row(out, name):
  """The cells of the table row whose first cell is `name`."""
  rows = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
  assert len(rows) == 1, out
  return rows[0][1:]


def _f(x):
  return f"{x:.4f}"


def _softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def test_logits_with_class_names(capsys):
  z = np.array([-3.44, 1.16, 3.91])
  rc, out, err = _run(
    capsys, "--logits", "-3.44", "1.16", "3.91", "--label", "2", "--classes", "dog", "cat", "panda"
  )
  assert rc == 0 and err == ""
  p = _softmax64(z)
  y = np.array([0.0, 0.0, 1.0])
  for i, name in enumerate(["dog", "cat", "panda"]):
    assert _row(out, name) == [
      _f(z[i]),
      _f(np.exp(z[i])),
      _f(p[i]),
      _f(-np.log(p[i])),
      str(int(y[i])),
      _f(p[i] - y[i]),
    ]
  # The numbers a learner checks by hand.
  assert [_row(out, n)[2] for n in ("dog", "cat", "panda")] == ["0.0006", "0.0601", "0.9393"]
  lse = np.log(np.exp(z).sum())
  assert f"= {_f(lse)}" in out and f"m = max z = {_f(z.max())}" in out
  assert "loss = −ln p[panda]" in out and "= 0.0626 nats" in out
  assert _f(-np.log(p[2])) == "0.0626"
  assert f"Σ {_f(np.exp(z).sum())} 1.0000 1" in " ".join(out.split())


def test_logits_label_by_name_and_default_names(capsys):
  rc, out, _ = _run(capsys, "--logits", "0", "1", "--label", "b", "--classes", "a", "b")
  assert rc == 0 and "label = b (class 1)" in out
  rc, out, _ = _run(capsys, "--logits", "0", "1", "--label", "1")
  assert rc == 0 and "label = 1" in out and _row(out, "1")[0] == "1.0000"


def test_logits_in_bits(capsys):
  z = np.array([-3.44, 1.16, 3.91])
  rc, out, _ = _run(capsys, "--logits", "-3.44", "1.16", "3.91", "--label", "2", "--base", "2")
  assert rc == 0
  p = _softmax64(z)
  assert "−log₂ p" in out
  assert _row(out, "0")[3] == _f(-np.log2(p[0]))
  assert f"= {_f(-np.log2(p[2]))} bits" in out
  assert "in nats: divide by ln 2" in out  # the gradient stays in nats
  assert _row(out, "2")[-1] == _f(p[2] - 1.0)


def test_logits_with_soft_target(capsys):
  z, y = np.array([2.0, 1.0, 0.0]), np.array([0.7, 0.2, 0.1])
  rc, out, _ = _run(capsys, "--logits", "2", "1", "0", "--target", "0.7", "0.2", "0.1")
  assert rc == 0
  p = _softmax64(z)
  loss = -(y * np.log(p)).sum()
  h = -(y * np.log(y)).sum()
  for i in range(3):
    assert _row(out, str(i))[4:] == [_f(y[i]), _f(-y[i] * np.log(p[i])), _f(p[i] - y[i])]
  assert f"loss = −Σ y·ln p = {_f(loss)} nats" in out
  assert f"H(y) + KL(y‖p) = {_f(h)} + {_f(loss - h)}" in out


def test_probs_with_label(capsys):
  rc, out, _ = _run(capsys, "--probs", "0.228", "0.619", "0.153", "--label", "1")
  assert rc == 0
  assert _row(out, "1") == ["0.6190", "0.4797", "1", "0.4797"]
  assert _f(-np.log(0.619)) == "0.4797"
  assert _row(out, "0") == ["0.2280", _f(-np.log(0.228)), "0", "0.0000"]
  assert "loss = −Σ y·ln q = −ln q[1] = −ln 0.6190 = 0.4797 nats" in out


def test_probs_in_bits(capsys):
  q = np.array([0.1, 0.5, 0.1, 0.1, 0.2])
  rc, out, _ = _run(
    capsys, "--probs", "0.1", "0.5", "0.1", "0.1", "0.2", "--label", "0", "--base", "2"
  )
  assert rc == 0
  assert _f(-np.log2(0.1)) == "3.3219"
  assert "= 3.3219 bits" in out
  for i in range(5):
    assert _row(out, str(i))[1] == _f(-np.log2(q[i]))


def test_probs_with_soft_target_and_zero_probability(capsys):
  rc, out, _ = _run(capsys, "--probs", "0", "0.25", "0.75", "--target", "0", "0.5", "0.5")
  assert rc == 0
  assert _row(out, "0") == ["0.0000", "inf", "0.0000", "0.0000"]  # 0·log 0 = 0
  loss = -(0.5 * np.log(0.25) + 0.5 * np.log(0.75))
  assert f"= {_f(loss)} nats" in out


def test_large_and_scientific_negative_logits(capsys):
  rc, out, _ = _run(capsys, "--logits", "-1e3", "100", "1000", "--label", "1")
  assert rc == 0
  assert "exp(z − m)" in out and _row(out, "0")[0] == "-1000.0000"
  assert "= 900.0000 nats" in out


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--probs", "0.5", "0.6", "--label", "0"], "--probs must sum to 1"),
    (["--probs", "-0.1", "1.1", "--label", "0"], "--probs must lie in [0, 1]"),
    (["--probs", "0.5", "0.5000011", "--label", "0"], "must sum to 1 (within 1e-06)"),
    (["--logits", "1", "2", "--label", "2"], "--label 2 is out of range for 2 classes"),
    (["--logits", "1", "2", "--label", "-1"], "--label -1 is out of range"),
    (["--logits", "1", "2", "--label", "cat"], "--label must be a class index 0..1"),
    (["--logits", "1", "2"], "exactly one of --label or --target"),
    (["--logits", "1", "2", "--label", "0", "--target", "1", "0"], "exactly one of --label"),
    (["--label", "0"], "exactly one of --logits or --probs"),
    (["--logits", "1", "--probs", "1", "--label", "0"], "exactly one of --logits or --probs"),
    (["--logits", "1", "x", "--label", "0"], "--logits takes numbers, got 'x'"),
    (["--logits", "1", "nan", "--label", "0"], "NaN"),
    (["--logits", "1", "inf", "--label", "0"], "+inf"),
    (["--logits", "1", "2", "--target", "0.5"], "--target has 1 values but --logits has 2"),
    (["--logits", "1", "2", "--target", "0.5", "0.6"], "--target must sum to 1"),
    (["--logits", "1", "2", "--label", "0", "--classes", "a"], "--classes names 1 classes"),
    (["--logits", "1", "2", "--label", "0", "--base", "1"], "--base must be"),
  ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, message):
  rc, out, err = _run(capsys, *argv)
  assert rc == 2 and out == ""
  assert err.startswith("xentjax explain: error: ") and err.count("\n") == 1
  assert message in err
  assert "Traceback" not in err


def test_leaves_global_x64_setting_alone(capsys):
  before = jnp.asarray(1.0).dtype
  assert _run(capsys, "--logits", "1", "2", "--label", "0")[0] == 0
  assert jnp.asarray(1.0).dtype == before


def test_help_lists_examples(capsys):
  with pytest.raises(SystemExit) as exc:
    main(["explain", "--help"])
  assert exc.value.code == 0
  assert "xentjax explain --logits -3.44 1.16 3.91 --label 2" in capsys.readouterr().out


def test_python_dash_m_entry_point():
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "xentjax",
      "explain",
      "--logits",
      "-3.44",
      "1.16",
      "3.91",
      "--label",
      "2",
    ],
    check=False,
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  assert "= 0.0626 nats" in proc.stdout


# Two signs in a row ("1000.0000 − -1000.0000", "+ -0.5", "/ -0.6931"): never printed.
DOUBLE_SIGN = r"[−+\-/] +[−+\-]|[−+]-"


@pytest.mark.parametrize(
  "argv",
  [
    ["--logits=-1000,1000", "--label", "0"],
    ["--logits", "1", "-inf", "--label", "1"],
    ["--logits=-3.44,1.16,3.91", "--label", "0", "--base", "2"],
    ["--logits=-1000,1000", "--label", "0", "--base", "0.5"],
    ["--logits=-5,-6,-7", "--label", "2", "--base", "10"],
    ["--logits=-5,-6,-7", "--target", "0.2", "0.3", "0.5", "--base", "0.5"],
    ["--logits", "2", "1", "0", "--target", "0.7", "0.2", "0.1"],
    ["--probs", "0.1", "0.9", "--label", "0", "--base", "0.5"],
    ["--probs", "0", "0.25", "0.75", "--target", "0", "0.5", "0.5", "--base", "0.25"],
  ],
)
def test_explain_never_prints_a_double_sign(capsys, argv):
  rc, out, err = _run(capsys, *argv)
  assert rc == 0, err
  assert not re.search(DOUBLE_SIGN, out), out


def test_explain_negative_label_score_is_added(capsys):
  # ln Σ exp(z) − z[0] with z[0] = -1000: written as a sum, and the float64 value.
  rc, out, _ = _run(capsys, "--logits=-1000,1000", "--label", "0")
  assert rc == 0
  z = np.array([-1000.0, 1000.0])
  lse = z.max() + np.log(np.sum(np.exp(z - z.max())))
  assert f"= {_f(lse)} + {_f(1000.0)} = {_f(lse - z[0])} nats" in out
  rc, out, _ = _run(capsys, "--logits", "1", "-inf", "--label", "1")
  assert rc == 0 and f"= {_f(1.0)} + inf = inf nats" in out


@pytest.mark.parametrize(
  "flag_values",
  [
    ["--logits", "1,,2"],
    ["--logits", ",1,2"],
    ["--logits", "1,2,"],
    ["--logits", "1", "", "2"],
    ["--probs", "0.5,,0.5"],
  ],
)
def test_empty_list_entries_are_an_error(capsys, flag_values):
  rc, out, err = _run(capsys, *flag_values, "--label", "0")
  assert rc == 2 and out == ""
  assert "empty entry" in err and err.count("\n") == 1
  rc, _, err = _run(capsys, "--logits", "1", "2", "--label", "0", "--classes", "a,,b")
  assert rc == 2 and "--classes has an empty entry" in err


def test_a_comma_before_the_next_word_only_separates(capsys):
  rc, out, _ = _run(capsys, "--logits", "1,", "2", "--label", "0")
  p = _softmax64([1.0, 2.0])
  assert rc == 0 and "2 classes" in out and _row(out, "0")[2] == _f(p[0])
