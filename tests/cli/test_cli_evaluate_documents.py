"""`xentjax evaluate --bytes FILE --per-document OUT`: bits per byte and per-document CSV.

The expected numbers are float64 NumPy computations on the saved arrays.
"""

import csv
import json
import math

import numpy as np
import pytest

from xentjax.cli._main import main


def run(capsys, *argv):
  code = main(["evaluate", "--no-progress", *map(str, argv)])
  out, err = capsys.readouterr()
  return code, out, err


def float64_nll(logits, labels, ignore_index=-100):
  z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  keep = y != ignore_index
  lse = np.logaddexp.reduce(z, axis=-1)
  return np.where(keep, lse - z[np.arange(len(y)), np.where(keep, y, 0)], 0.0), keep


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  out = []
  for i, n in enumerate((700, 300)):
    logits = (rng.standard_normal((n, 10)) * 2).astype(np.float32)
    labels = rng.integers(0, 10, n)
    labels[::50] = -100
    nbytes = rng.integers(1, 5, n)
    docs = (np.arange(n) // 120) * 10 + i  # several documents per file
    for name, a in (("logits", logits), ("labels", labels), ("bytes", nbytes), ("docs", docs)):
      np.save(tmp_path / f"{name}{i}.npy", a)
    out.append((logits, labels, nbytes, docs))
  return tmp_path, out


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def files_args(d, extra=("bytes",)):
  argv = []
  for i in range(2):
    argv += ["--logits", d / f"logits{i}.npy", "--labels", d / f"labels{i}.npy"]
    if "bytes" in extra:
      argv += ["--bytes", d / f"bytes{i}.npy"]
    if "docs" in extra:
      argv += ["--documents", d / f"docs{i}.npy"]
  return argv


def test_bits_per_byte_in_json_and_table(files, capsys):
  d, arrays = files
  code, out, err = run(capsys, *files_args(d), "--batch-size", 256, "--json")
  assert code == 0, err
  got = json.loads(out)
  assert got["units"]["bits_per_byte"] == "bits"
  nll = np.concatenate([float64_nll(z, y)[0] for z, y, _, _ in arrays])
  keep = np.concatenate([float64_nll(z, y)[1] for z, y, _, _ in arrays])
  nbytes = np.concatenate([b for _, _, b, _ in arrays])
  assert got["byte_count"] == nbytes[keep].sum()
  np.testing.assert_allclose(
    got["bits_per_byte"], nll.sum() / math.log(2) / nbytes[keep].sum(), rtol=1e-6
  )
  code, out, _ = run(capsys, *files_args(d))
  assert code == 0 and "bits per byte" in out


def test_per_document_csv_from_document_ids(files, capsys, tmp_path):
  d, arrays = files
  out_csv = tmp_path / "docs.csv"
  code, _, err = run(
    capsys, *files_args(d, ("bytes", "docs")), "--per-document", out_csv, "--batch-size", 128
  )
  assert code == 0, err
  assert f"wrote {out_csv}" in err
  rows = read_csv(out_csv)
  nll = np.concatenate([float64_nll(z, y)[0] for z, y, _, _ in arrays])
  keep = np.concatenate([float64_nll(z, y)[1] for z, y, _, _ in arrays])
  nbytes = np.concatenate([b for _, _, b, _ in arrays])
  docs = np.concatenate([ids for _, _, _, ids in arrays])
  assert [int(r["document"]) for r in rows] == sorted(set(docs.tolist()))
  for r in rows:
    at = docs == int(r["document"])
    assert int(r["tokens"]) == keep[at].sum()
    assert int(r["bytes"]) == nbytes[at & keep].sum()
    np.testing.assert_allclose(float(r["nll_nats"]), nll[at].sum(), rtol=1e-6)
    bpb = nll[at].sum() / math.log(2) / nbytes[at & keep].sum()
    np.testing.assert_allclose(float(r["bits_per_byte"]), bpb, rtol=1e-6)
    assert r["file"] == ""


def test_per_document_without_ids_is_one_document_per_file(files, capsys, tmp_path):
  d, arrays = files
  out_csv = tmp_path / "files.csv"
  code, _, err = run(capsys, *files_args(d, ()), "--per-document", out_csv)
  assert code == 0, err
  rows = read_csv(out_csv)
  assert [int(r["document"]) for r in rows] == [0, 1]
  assert [r["file"] for r in rows] == [str(d / "logits0.npy"), str(d / "logits1.npy")]
  for r, (z, y, _, _) in zip(rows, arrays):
    nll, keep = float64_nll(z, y)
    assert int(r["tokens"]) == keep.sum()
    assert r["bytes"] == "" and r["bits_per_byte"] == ""  # no --bytes given
    np.testing.assert_allclose(float(r["nll_nats"]), nll.sum(), rtol=1e-6)


def test_raw_bytes_file(files, capsys):
  d, arrays = files
  argv = []
  for i, (_, _, nbytes, _) in enumerate(arrays):
    nbytes.astype(np.int16).tofile(d / f"bytes{i}.bin")
    argv += ["--logits", d / f"logits{i}.npy", "--labels", d / f"labels{i}.npy"]
    argv += ["--bytes", d / f"bytes{i}.bin"]
  code, out, err = run(capsys, *argv, "--bytes-dtype", "int16", "--json")
  assert code == 0, err
  keep = np.concatenate([float64_nll(z, y)[1] for z, y, _, _ in arrays])
  assert json.loads(out)["byte_count"] == np.concatenate([b for *_, b, _ in arrays])[keep].sum()


def assert_error(capsys, match, *argv):
  code, out, err = run(capsys, *argv)
  assert code == 2
  assert out == ""
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("xentjax evaluate: error:"), err
  assert match in lines[0], lines[0]


def test_errors_are_one_line(files, capsys, tmp_path):
  d, _ = files
  pair = ["--logits", d / "logits0.npy", "--labels", d / "labels0.npy"]
  np.save(tmp_path / "neg.npy", -np.ones(700, np.int64))
  np.save(tmp_path / "float.npy", np.ones(700, np.float32))
  np.save(tmp_path / "short.npy", np.ones(699, np.int64))
  assert_error(capsys, "negative", *pair, "--bytes", tmp_path / "neg.npy")
  assert_error(capsys, "integers", *pair, "--bytes", tmp_path / "float.npy")
  assert_error(capsys, "one entry per token", *pair, "--bytes", tmp_path / "short.npy")
  assert_error(capsys, "one --bytes per --logits", *pair, *pair, "--bytes", d / "bytes0.npy")
  assert_error(capsys, "--per-document", *pair, "--documents", d / "docs0.npy")
  assert_error(capsys, "not found", *pair, "--bytes", tmp_path / "missing.npy")
