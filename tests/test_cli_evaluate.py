"""Tests for `xentjax evaluate`: files in, table or JSON out, one-line errors."""

import json

import numpy as np
import pytest

from xentjax._cli import main


def float64_reference(logits, labels, top_k=5, ignore_index=-100):
  z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  keep = y != ignore_index
  z, y = z[keep], y[keep]
  lse = np.logaddexp.reduce(z, axis=-1)
  z_y = z[np.arange(len(y)), y]
  higher = (z > z_y[:, None]).sum(-1)
  return {
    "count": len(y),
    "cross_entropy": (lse - z_y).mean(),
    "accuracy": (higher == 0).mean(),
    "top_k_accuracy": (higher < top_k).mean(),
  }


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((1000, 10)) * 2).astype(np.float32)
  labels = rng.integers(0, 10, 1000)
  labels[::50] = -100
  np.save(tmp_path / "logits.npy", logits)
  np.save(tmp_path / "labels.npy", labels)
  return tmp_path, logits, labels


def run(capsys, *argv):
  code = main(["evaluate", "--no-progress", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err


def test_json_matches_float64(files, capsys):
  d, logits, labels = files
  code, out, err = run(
      capsys, "--logits", d / "logits.npy", "--labels", d / "labels.npy",
      "--batch-size", 300, "--top-k", 3, "--json",
  )  # fmt: skip
  assert code == 0, err
  got = json.loads(out)
  ref = float64_reference(logits, labels, top_k=3)
  assert got["count"] == ref["count"] == 980
  np.testing.assert_allclose(got["cross_entropy"], ref["cross_entropy"], rtol=1e-6)
  np.testing.assert_allclose(got["accuracy"], ref["accuracy"], rtol=1e-12)
  np.testing.assert_allclose(got["top_k_accuracy"], ref["top_k_accuracy"], rtol=1e-12)
  assert got["top_k"] == 3


def test_table_and_base(files, capsys):
  d, logits, labels = files
  code, out, _ = run(
    capsys, "--logits", d / "logits.npy", "--labels", d / "labels.npy", "--base", 2
  )
  assert code == 0
  assert "cross-entropy (bits)" in out and "980" in out and "perplexity" in out
  line = next(x for x in out.splitlines() if x.startswith("cross-entropy"))
  expected = float64_reference(logits, labels)["cross_entropy"] / np.log(2)
  np.testing.assert_allclose(float(line.split()[-1]), expected, rtol=1e-5)


def test_raw_binary_files(files, capsys):
  d, logits, labels = files
  logits.astype(np.float16).tofile(d / "logits.bin")
  labels.astype(np.int32).tofile(d / "labels.bin")
  code, out, err = run(
      capsys, "--logits", d / "logits.bin", "--labels", d / "labels.bin",
      "--shape", "1000,10", "--dtype", "float16", "--labels-dtype", "int32", "--json",
  )  # fmt: skip
  assert code == 0, err
  ref = float64_reference(logits.astype(np.float16), labels)
  np.testing.assert_allclose(json.loads(out)["cross_entropy"], ref["cross_entropy"], rtol=1e-6)


def test_soft_labels_file(files, capsys):
  d, logits, _ = files
  soft = np.random.default_rng(1).dirichlet(np.ones(10), 1000).astype(np.float32)
  np.save(d / "soft.npy", soft)
  code, out, err = run(capsys, "--logits", d / "logits.npy", "--labels", d / "soft.npy", "--json")
  assert code == 0, err
  z = logits.astype(np.float64)
  logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
  expected = -(soft * logp).sum(-1).mean()
  np.testing.assert_allclose(json.loads(out)["cross_entropy"], expected, rtol=1e-6)


def assert_error(capsys, match, *argv):
  code, out, err = run(capsys, *argv)
  assert code == 2
  assert out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("xentjax evaluate: error:"), err
  assert match in lines[0], lines[0]


def test_missing_file(files, capsys):
  d, _, _ = files
  assert_error(capsys, "not found", "--logits", d / "nope.npy", "--labels", d / "labels.npy")
  assert_error(capsys, "not found", "--logits", d / "logits.npy", "--labels", d / "nope.npy")


def test_mismatched_lengths(files, capsys):
  d, _, labels = files
  np.save(d / "short.npy", labels[:999])
  assert_error(capsys, "1000 rows", "--logits", d / "logits.npy", "--labels", d / "short.npy")


@pytest.mark.parametrize("bad", [10, -1, 12345])
def test_labels_out_of_range(files, capsys, bad):
  d, _, labels = files
  labels = labels.copy()
  labels[777] = bad
  np.save(d / "bad.npy", labels)
  assert_error(
      capsys, f"label {bad} is out of range", "--logits", d / "logits.npy", "--labels",
      d / "bad.npy",
  )  # fmt: skip


def test_ignore_index_is_not_out_of_range(files, capsys):
  d, _, labels = files
  labels = np.where(labels == -100, 7, labels)
  labels[:3] = 99
  np.save(d / "ign.npy", labels)
  code, out, err = run(
      capsys, "--logits", d / "logits.npy", "--labels", d / "ign.npy", "--ignore-index", 99,
      "--json",
  )  # fmt: skip
  assert code == 0, err
  assert json.loads(out)["count"] == 997


def test_wrong_shapes_and_types(files, capsys):
  d, logits, labels = files
  np.save(d / "flat.npy", logits.reshape(-1))
  assert_error(capsys, "shape", "--logits", d / "flat.npy", "--labels", d / "labels.npy")
  np.save(d / "int_logits.npy", labels.reshape(1000, 1))
  assert_error(capsys, "floating", "--logits", d / "int_logits.npy", "--labels", d / "labels.npy")
  np.save(d / "lab2.npy", labels.reshape(1000, 1))
  assert_error(capsys, "shape", "--logits", d / "logits.npy", "--labels", d / "lab2.npy")
  (d / "junk.npy").write_bytes(b"not a numpy file")
  assert_error(capsys, ".npy", "--logits", d / "junk.npy", "--labels", d / "labels.npy")


def test_raw_file_errors(files, capsys):
  d, logits, _ = files
  logits.tofile(d / "logits.bin")
  assert_error(capsys, "--shape", "--logits", d / "logits.bin", "--labels", d / "labels.npy")
  assert_error(
      capsys, "bytes", "--logits", d / "logits.bin", "--labels", d / "labels.npy",
      "--shape", "1000,11",
  )  # fmt: skip
  assert_error(
      capsys, "--shape", "--logits", d / "logits.bin", "--labels", d / "labels.npy",
      "--shape", "a,b",
  )  # fmt: skip
  assert_error(
      capsys, "dtype", "--logits", d / "logits.bin", "--labels", d / "labels.npy",
      "--shape", "1000,10", "--dtype", "float99",
  )  # fmt: skip
  (d / "odd.bin").write_bytes(b"\x00" * 7)
  assert_error(capsys, "multiple", "--logits", d / "logits.npy", "--labels", d / "odd.bin")


def test_bad_options(files, capsys):
  d, _, _ = files
  common = ["--logits", d / "logits.npy", "--labels", d / "labels.npy"]
  assert_error(capsys, "--batch-size", *common, "--batch-size", 0)
  assert_error(capsys, "--top-k", *common, "--top-k", 0)
  assert_error(capsys, "--base", *common, "--base", 1)
