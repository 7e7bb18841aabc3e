"""Tests for `xentjax demo`, run through the CLI dispatcher."""

import re

import numpy as np
import pytest

from xentjax.cli import _main as _cli


def _number(pattern, text):
  match = re.search(pattern, text, flags=re.MULTILINE)
  assert match, f"no line matching {pattern!r} in:\n{text}"
  return float(match.group(1))


def test_default_demo(tmp_path, capsys):
  assert _cli.main(["demo", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  epoch_losses = [float(v) for v in re.findall(r"^epoch +\d+ +loss ([0-9.]+)", out, re.MULTILINE)]
  assert len(epoch_losses) == 30
  assert epoch_losses[-1] < 0.5 * epoch_losses[0]
  assert 0.85 <= _number(r"^test accuracy: ([0-9.]+)$", out) <= 1.0
  assert 0.85 <= _number(r"^train accuracy: ([0-9.]+)$", out) <= 1.0
  top5 = _number(r"^top-5 accuracy: ([0-9.]+)$", out)
  assert _number(r"^test accuracy: ([0-9.]+)$", out) <= top5 <= 1.0
  assert _number(r"jax\.grad - \(softmax - onehot\)\|.*: ([0-9.e+-]+) \(ok", out) <= 1e-5
  png = tmp_path / "loss_curve.png"
  assert f"loss curve: {png}" in out
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare(tmp_path, capsys):
  assert _cli.main(["demo", "--compare", "--epochs", "4", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert re.search(
    r"^loss +\| epochs to 90% train accuracy +\| final test accuracy$", out, re.MULTILINE
  )
  rows = re.findall(r"^(ce|mse|hinge) +\| (\d+|never) +\| ([0-9.]+)$", out, re.MULTILINE)
  assert [r[0] for r in rows] == ["ce", "mse", "hinge"]
  assert all(0.5 < float(r[2]) <= 1.0 for r in rows)
  assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
  # Without --optimizer the comparison runs plain SGD (Adam rescales gradients
  # and would hide the saturation of squared error).
  assert "optimizer sgd" in out


def test_other_loss_and_optimizer_without_plot(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  argv = [
    "demo",
    "--loss",
    "focal",
    "--optimizer",
    "sgd",
    "--lr",
    "0.5",
    "--epochs",
    "2",
    "--batch-size",
    "128",
    "--no-plot",
  ]
  assert _cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "loss focal" in out and "optimizer sgd lr 0.5" in out
  assert len(re.findall(r"^epoch ", out, re.MULTILINE)) == 2
  assert _number(r"^test accuracy: ([0-9.]+)$", out) > 0.5
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'"),
    (["--loss", "kl"], "unknown loss 'kl'"),
    (["--lr", "-1"], "--lr must be"),
    (["--lr", "fast"], "--lr must be a number"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "x"], "--batch-size must be a number"),
    (["--compare", "--loss", "ce"], "leave out --loss"),
  ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
  assert _cli.main(["demo", "--out", str(tmp_path), *argv]) == 2
  captured = capsys.readouterr()
  err = captured.err.strip()
  assert "\n" not in err and err.startswith("xentjax demo: error:") and message in err
  assert captured.out == ""


def test_out_that_is_a_file_is_an_error(tmp_path, capsys):
  target = tmp_path / "file.txt"
  target.write_text("x")
  assert _cli.main(["demo", "--out", str(target)]) == 2
  assert "not a directory" in capsys.readouterr().err


def test_out_is_checked_before_training(tmp_path, capsys):
  # A missing parent: nothing is created, and the error comes before any training line.
  assert _cli.main(["demo", "--out", str(tmp_path / "a" / "b")]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and "parent directory" in captured.err
  assert "\n" not in captured.err.strip() and not (tmp_path / "a").exists()
  # A place where nothing can be written (/proc refuses new entries, even to root).
  assert _cli.main(["demo", "--out", "/proc/xentjax-out"]) == 2
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err.startswith("xentjax demo: error: --out")
  assert "\n" not in captured.err.strip()
  assert _cli.main(["demo", "--out", "/proc"]) == 2
  assert "cannot write there" in capsys.readouterr().err


def test_out_creates_only_the_last_directory(tmp_path):
  from xentjax.cli._demo import _prepare_out

  _prepare_out(str(tmp_path / "new"))
  assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


# `xentjax demo --distill` is deterministic.

_DISTILL_RUN = (
  "import json; from xentjax.demos import distill as D; "
  "r = D.compare(temperatures=(2.0,), betas=(0.0,), steps=30, seed=3); "
  "print(json.dumps({'teacher': r['teacher'], 'labels_only': r['labels_only'], "
  "'distilled': r['distilled'][(2.0, 0.0)]}))"
)


def _distill_in_fresh_process(x64: bool) -> dict:
  import json
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[2]
  env = {**os.environ, "JAX_ENABLE_X64": "1" if x64 else "0", "JAX_PLATFORMS": "cpu"}
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  run = subprocess.run(
    [sys.executable, "-c", _DISTILL_RUN],
    check=False,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1])


def test_demo_distill_is_deterministic_and_float32_under_x64():
  import jax
  import jax.numpy as jnp

  from xentjax.demos import distill as _demo_distill

  first, second = _distill_in_fresh_process(False), _distill_in_fresh_process(False)
  assert first == second  # two processes, one table
  assert 0.5 < first["labels_only"] < first["teacher"] <= 1.0
  # The parameters and data are float32 whatever JAX_ENABLE_X64 says: the
  # teacher and the label-only student (plain fused cross-entropy) come out the
  # same under x64 (they were 0.9600 / 0.9089 against 0.9733 / 0.8933 before).
  x64 = _distill_in_fresh_process(True)
  assert (x64["teacher"], x64["labels_only"]) == (first["teacher"], first["labels_only"])
  params = _demo_distill._init(jax.random.key(0), 4, 3, 2)
  assert {v.dtype for v in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


def test_contrastive_demo(capsys):
  assert _cli.main(["demo", "--contrastive"]) == 0
  out = capsys.readouterr().out
  rows = re.findall(
    r"^ *(\d+) \| +([0-9.]+) \| +([0-9.]+) \| +(-?[0-9.]+) \| +([0-9.]+) \| +([0-9.]+) \| +([0-9.]+)$",
    out,
    re.MULTILINE,
  )
  assert [int(r[0]) for r in rows] == [1, 100, 200, 300, 400, 500, 600]
  loss, scale, bits, top1, _, top5 = (np.array([float(r[i]) for r in rows]) for i in range(1, 7))
  assert loss[-1] < 0.5 * loss[0] and scale[-1] > scale[0]  # it learns, and sharpens
  # The bound log B - L (bits) can never pass log2(256) = 8 bits.
  np.testing.assert_allclose(bits, (np.log(256) - loss) / np.log(2), atol=0.01)
  assert np.all(bits <= 8.0) and bits[-1] > 4.0
  assert top1[-1] > 0.1 and np.all(top5 >= top1)  # chance is 1/450
  assert re.search(
    r"^bound log B - L = [0-9.]+ bits of the log2\(256\) = 8 bits", out, re.MULTILINE
  )


def test_docs_list_every_loss_and_optimizer_the_parser_takes():
  # docs/cli.md writes the choices out in prose; the parser is the truth.
  import pathlib

  from xentjax.cli import _demo

  text = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
  documented = {
    flag: tuple(re.search(rf"`{flag} ([\w|]+)`", text).group(1).split("|"))
    for flag in ("--loss", "--optimizer")
  }
  assert documented["--loss"] == _demo.DEMO_LOSSES
  assert documented["--optimizer"] == tuple(_demo.DEFAULT_LR)
  # The generated help (also on the page) names the same ones.
  demo = _cli.build_parser()._subparsers._group_actions[0].choices["demo"]
  help_text = " ".join(demo.format_help().split())
  assert f"one of {', '.join(_demo.DEMO_LOSSES)}" in help_text
