"""Tests for `xentjax evaluate`: files in, table or JSON out, one-line errors."""

import json

import numpy as np
import pytest

from xentjax.cli._main import main


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


@pytest.mark.parametrize("base", [None, 2, 10])
def test_json_says_the_unit_of_each_logarithmic_field(files, capsys, base):
  d, logits, labels = files
  argv = ["--logits", d / "logits.npy", "--labels", d / "labels.npy", "--json"]
  code, out, err = run(capsys, *argv, *(["--base", base] if base else []))
  assert code == 0, err
  got = json.loads(out)
  ref = float64_reference(logits, labels)
  unit = {None: "nats", 2: "bits", 10: "base 10"}[base]
  assert got["units"] == {
    "cross_entropy": unit,
    "bits_per_token": "bits",
    "negative_log_likelihood_sum": "nats",
  }
  # Each field in the unit it names (float64 references).
  np.testing.assert_allclose(
    got["cross_entropy"], ref["cross_entropy"] / np.log(base or np.e), rtol=1e-6
  )
  np.testing.assert_allclose(got["bits_per_token"], ref["cross_entropy"] / np.log(2), rtol=1e-6)
  np.testing.assert_allclose(
    got["negative_log_likelihood_sum"], ref["cross_entropy"] * ref["count"], rtol=1e-6
  )


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


# ---------------------------------------------------------------------------
# What a first session with the command tripped on (one regression test each).


def test_npz_archives(files, capsys):
  d, logits, labels = files
  np.savez(d / "one.npz", logits)  # a single array: taken whatever its name
  np.savez(d / "both.npz", logits=logits, labels=labels)  # named by role
  ref = float64_reference(logits, labels)
  for argv in (
    ["--logits", d / "one.npz", "--labels", d / "labels.npy"],
    ["--logits", d / "both.npz", "--labels", d / "both.npz"],
    ["--logits", f"{d / 'both.npz'}:logits", "--labels", f"{d / 'both.npz'}:labels"],
  ):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    np.testing.assert_allclose(json.loads(out)["cross_entropy"], ref["cross_entropy"], rtol=1e-6)
  np.savez(d / "many.npz", a=logits, b=logits)
  assert_error(capsys, "holds 2 arrays", "--logits", d / "many.npz", "--labels", d / "labels.npy")
  assert_error(
    capsys, "no array 'c'", "--logits", f"{d / 'many.npz'}:c", "--labels", d / "labels.npy"
  )


def test_text_file_named_npy(files, capsys):
  d, _, _ = files
  (d / "text.npy").write_text("0.1, 0.2\n")
  assert_error(capsys, "not a .npy file", "--logits", d / "text.npy", "--labels", d / "labels.npy")


@pytest.mark.parametrize("shape", ["10,x", "1000,", "1000,10,x", "-1", "1000,-10"])
def test_shape_is_parsed_strictly(files, capsys, shape):
  d, logits, _ = files
  logits.tofile(d / "logits.bin")
  assert_error(
    capsys, "--shape", "--logits", d / "logits.bin", "--labels", d / "labels.npy", "--shape", shape
  )


def test_shape_rows_from_file_size_and_x_separator(files, capsys):
  d, logits, labels = files
  logits.tofile(d / "logits.bin")
  ref = float64_reference(logits, labels)
  for shape in ("--shape=-1,10", "--shape=1000x10"):
    code, out, err = run(
      capsys, "--logits", d / "logits.bin", "--labels", d / "labels.npy", shape, "--json"
    )
    assert code == 0, err
    assert json.loads(out)["count"] == ref["count"]


def test_shape_and_dtype_are_not_ignored_for_npy(files, capsys):
  d, _, _ = files
  common = ["--logits", d / "logits.npy", "--labels", d / "labels.npy"]
  assert_error(capsys, "holds shape (1000, 10)", *common, "--shape", "1000,12")
  assert_error(capsys, "holds float32", *common, "--dtype", "float16")
  code, _, err = run(capsys, *common, "--shape", "1000,10", "--dtype", "float32")  # agree: fine
  assert code == 0, err


def test_top_k_above_the_number_of_classes(files, capsys):
  d, _, _ = files
  assert_error(
    capsys, "--top-k 99 is more than the 10 classes", "--logits", d / "logits.npy",
    "--labels", d / "labels.npy", "--top-k", 99,
  )  # fmt: skip
  code, out, _ = run(
    capsys, "--logits", d / "logits.npy", "--labels", d / "labels.npy", "--top-k", 10, "--json"
  )
  assert code == 0 and json.loads(out)["top_k_accuracy"] == 1.0


def test_nan_logits_are_an_error_naming_the_row(files, capsys):
  d, logits, _ = files
  bad = logits.copy()
  bad[3, 4] = np.nan  # labels[0] is -100 (ignored), row 3 counts
  np.save(d / "nan.npy", bad)
  assert_error(capsys, "row [3]", "--logits", d / "nan.npy", "--labels", d / "labels.npy")
  bad = logits.copy()
  bad[7] = np.inf
  np.save(d / "inf.npy", bad)
  assert_error(capsys, "is NaN", "--logits", d / "inf.npy", "--labels", d / "labels.npy")


def test_header_counts_every_position(tmp_path, capsys):
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((50, 20, 30)).astype(np.float32)
  labels = rng.integers(0, 30, (50, 20))
  np.save(tmp_path / "z.npy", logits)
  np.save(tmp_path / "y.npy", labels)
  code, out, err = run(capsys, "--logits", tmp_path / "z.npy", "--labels", tmp_path / "y.npy")
  assert code == 0, err
  header = out.splitlines()[0]
  assert "1,000 examples" in header and "50 x 20 positions" in header and "30 classes" in header
  assert "1,000" in next(x for x in out.splitlines() if x.startswith("examples"))


def test_unknown_subcommand_flag_prints_that_subcommands_usage(capsys):
  with pytest.raises(SystemExit) as e:
    main(["explain", "--logits", "1", "2", "--lable", "1"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "usage: xentjax explain" in err and "unrecognized arguments: --lable 1" in err


def test_version(capsys):
  import xentjax

  with pytest.raises(SystemExit) as e:
    main(["--version"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith(f"xentjax {xentjax.__version__} (jax ")


def test_empty_npy_file(files, capsys):
  d, _, _ = files
  (d / "empty.npy").write_bytes(b"")
  assert_error(capsys, "empty (0 bytes)", "--logits", d / "empty.npy", "--labels", d / "labels.npy")


def test_big_endian_npy_is_read(files, capsys):
  d, logits, labels = files
  np.save(d / "be.npy", logits.astype(">f4"))
  np.save(d / "be_labels.npy", labels.astype(">i8"))
  code, out, err = run(capsys, "--logits", d / "be.npy", "--labels", d / "be_labels.npy", "--json")
  assert code == 0, err
  ref = float64_reference(logits, labels)
  np.testing.assert_allclose(json.loads(out)["cross_entropy"], ref["cross_entropy"], rtol=1e-6)


def test_unreadable_raw_file(files, capsys, monkeypatch):
  d, logits, _ = files
  logits.tofile(d / "logits.bin")

  def denied(*args, **kwargs):  # the test runs as root, where chmod does not stop a read
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(np, "memmap", denied)
  assert_error(
    capsys, "Permission denied", "--logits", d / "logits.bin", "--labels", d / "labels.npy",
    "--shape", "1000,10",
  )  # fmt: skip


def test_zero_classes(tmp_path, capsys):
  np.save(tmp_path / "z.npy", np.zeros((4, 0), np.float32))
  np.save(tmp_path / "y.npy", np.full(4, -100))
  assert_error(capsys, "0 classes", "--logits", tmp_path / "z.npy", "--labels", tmp_path / "y.npy")


def test_json_has_no_nan_or_infinity(files, capsys):
  d, logits, labels = files
  z = logits.copy()
  i = int(np.flatnonzero(labels != -100)[0])
  z[i, labels[i]] = -np.inf  # the target has probability 0: an infinite loss, no NaN
  np.save(d / "neginf.npy", z)
  code, out, err = run(capsys, "--logits", d / "neginf.npy", "--labels", d / "labels.npy", "--json")
  assert code == 0, err

  def reject(constant):
    raise AssertionError(f"not JSON: {constant}")

  got = json.loads(out, parse_constant=reject)
  assert got["cross_entropy"] is None and got["perplexity"] is None and got["count"] == 980


def test_directory_is_not_reported_as_missing(files, capsys):
  d, _, _ = files
  assert_error(capsys, "is a directory", "--logits", d, "--labels", d / "labels.npy")


def test_raw_labels_dtype_hint(files, capsys):
  d, _, labels = files
  labels.astype(np.int32).tofile(d / "labels32.bin")
  assert_error(
    capsys, "try --labels-dtype int32", "--logits", d / "logits.npy", "--labels", d / "labels32.bin"
  )


def test_no_examples_is_an_error(tmp_path, capsys):
  np.save(tmp_path / "z0.npy", np.zeros((0, 5), np.float32))
  np.save(tmp_path / "y0.npy", np.zeros(0, np.int64))
  np.save(tmp_path / "z.npy", np.zeros((6, 5), np.float32))
  np.save(tmp_path / "y.npy", np.full(6, -100))
  assert_error(
    capsys, "no examples", "--logits", tmp_path / "z0.npy", "--labels", tmp_path / "y0.npy"
  )
  assert_error(
    capsys, "every one of the 6 labels is ignored", "--logits", tmp_path / "z.npy",
    "--labels", tmp_path / "y.npy",
  )  # fmt: skip


def test_several_files_are_one_data_set(files, capsys):
  d, logits, labels = files
  for i, (a, b) in enumerate(((0, 400), (400, 1000))):
    np.save(d / f"z{i}.npy", logits[a:b])
    np.save(d / f"y{i}.npy", labels[a:b])
  code, out, err = run(
    capsys, "--logits", d / "z0.npy", "--labels", d / "y0.npy",
    "--logits", d / "z1.npy", "--labels", d / "y1.npy", "--json", "--top-k", 3,
  )  # fmt: skip
  assert code == 0, err
  got, ref = json.loads(out), float64_reference(logits, labels, top_k=3)
  assert got["count"] == ref["count"] and got["top_k_accuracy"] == ref["top_k_accuracy"]
  np.testing.assert_allclose(got["cross_entropy"], ref["cross_entropy"], rtol=1e-6)
  # {process} names this process's own file (process 0 when alone).
  code, out, err = run(capsys, "--logits", d / "z{process}.npy", "--labels", d / "y{process}.npy")
  assert code == 0, err
  assert "z0.npy" in out and "400 examples" in out
  assert_error(
    capsys, "one --labels per --logits", "--logits", d / "z0.npy", "--logits", d / "z1.npy",
    "--labels", d / "y0.npy",
  )  # fmt: skip


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--num-processes", "2"], "missing --coordinator, --process-id"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "0..1"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--timeout", "0"],
     "--timeout"),
  ],
)  # fmt: skip
def test_bad_job_options(files, capsys, argv, message):
  d, _, _ = files
  assert_error(capsys, message, "--logits", d / "logits.npy", "--labels", d / "labels.npy", *argv)


def test_distributed_without_a_cluster_is_one_line(files):
  import os
  import subprocess
  import sys

  d, _, _ = files
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_COORD"))}
  env["PYTHONPATH"] = os.pathsep.join(sys.path)
  proc = subprocess.run(
    [sys.executable, "-m", "xentjax", "evaluate", "--distributed", "--logits", str(d / "logits.npy"),
     "--labels", str(d / "labels.npy")],
    capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL, check=False,
  )  # fmt: skip
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr
  assert proc.stderr.count("\n") == 1 and "no cluster detected" in proc.stderr, proc.stderr


def test_calibrate_reports_the_map_before_and_after(files, capsys):
  from xentjax import calibration as C
  from xentjax.cli import _evaluate

  assert _evaluate._CALIBRATION_METHODS == C.METHODS
  d, logits, labels = files
  argv = ["--logits", d / "logits.npy", "--labels", d / "labels.npy", "--json"]
  code, out, err = run(capsys, *argv, "--calibrate", "dirichlet", "--odir", "0.001,0.01")
  assert code == 0, err
  got = json.loads(out)["calibration"]
  keep = labels != -100
  z, y = logits[keep], labels[keep]
  cal = C.fit(z, y, "dirichlet", (1e-3, 1e-2))
  ref = float64_reference(np.asarray(cal(z)), y)
  assert got["rows"] == 980 and got["method"] == "dirichlet" and got["odir"] == [1e-3, 1e-2]
  np.testing.assert_allclose(got["after"]["cross_entropy"], ref["cross_entropy"], rtol=1e-4)
  np.testing.assert_allclose(
    got["before"]["ece"], json.loads(out)["expected_calibration_error"], atol=1e-6
  )
  np.testing.assert_allclose(
    got["after"]["ace"], C.adaptive_calibration_error(cal(z), y), atol=1e-5
  )
  assert got["after"]["cross_entropy"] < got["before"]["cross_entropy"]
  code, out, _ = run(capsys, *argv[:-1], "--calibrate", "temperature")
  assert code == 0 and "calibration map: temperature" in out and "smooth ECE" in out
  t = float(C.fit_temperature(z, y))
  assert f"T = {t:.4g}" in out


@pytest.mark.parametrize("method", ["vector", "matrix"])
def test_calibrate_fits_every_map(files, capsys, method):
  from xentjax import calibration as C

  d, logits, labels = files
  argv = ["--logits", d / "logits.npy", "--labels", d / "labels.npy", "--json"]
  code, out, err = run(capsys, *argv, "--calibrate", method)
  assert code == 0, err
  got = json.loads(out)["calibration"]
  keep = labels != -100
  z, y = logits[keep], labels[keep]
  ref = float64_reference(np.asarray(C.fit(z, y, method)(z)), y)
  assert got["method"] == method and got["odir"] is None and got["rows"] == 980
  np.testing.assert_allclose(got["after"]["cross_entropy"], ref["cross_entropy"], rtol=1e-4)
  assert got["after"]["cross_entropy"] < got["before"]["cross_entropy"]


def test_calibrate_option_errors(files, capsys):
  d, _, _ = files
  argv = ["--logits", d / "logits.npy", "--labels", d / "labels.npy"]
  code, _, err = run(capsys, *argv, "--calibrate", "vector", "--odir", "0.1,0.1")
  assert code == 2 and "--odir applies to --calibrate matrix" in err
  code, _, err = run(capsys, *argv, "--calibrate", "matrix", "--odir", "0.1")
  assert code == 2 and "--odir must be two numbers" in err
  with pytest.raises(SystemExit):
    main(["evaluate", *map(str, argv), "--calibrate", "platt"])
