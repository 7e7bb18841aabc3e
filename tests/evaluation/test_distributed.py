"""`xentjax.distributed` in one process: the share of the data, the exact exchange format, merging.

The real multi-process runs are in `tests/evaluation/test_evaluate_multiprocess.py`.
"""

import math

import numpy as np
import pytest

import xentjax
from xentjax import distributed as dist


def test_process_share_round_robin_covers_every_item_once():
  items = [f"shard{i}" for i in range(7)]
  shares = [dist.process_share(items, process_id=p, num_processes=3) for p in range(3)]
  assert shares == [["shard0", "shard3", "shard6"], ["shard1", "shard4"], ["shard2", "shard5"]]
  assert sorted(s for share in shares for s in share) == sorted(items)
  assert dist.process_share(items[:1], process_id=1, num_processes=2) == []
  assert dist.process_share(items) == items  # one process: everything
  with pytest.raises(ValueError, match="process_id < num_processes"):
    dist.process_share(items, process_id=2, num_processes=2)


def test_exchange_format_is_exact():
  tree = {
    "nll": [0.1, -1e-300, math.inf, math.nan, 1 / 3],
    "count": 2**70 + 1,
    "bins": np.arange(5, dtype=np.int64) * 3,
    "scalar": np.asarray(7, np.int64),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    "resid": [np.array([1e-8, -2.5], np.float64), np.array([0.1], np.float32)],
    "flag": True,
    "name": None,
    "nested": {"a": (1, 2.5)},
  }
  back = dist._decode(dist._encode(tree))
  assert back["count"] == 2**70 + 1 and back["flag"] is True and back["name"] is None
  assert [x.hex() for x in back["nll"][:3]] == [x.hex() for x in tree["nll"][:3]]
  assert math.isnan(back["nll"][3]) and back["nll"][4] == 1 / 3
  assert back["bins"].dtype == np.int64 and back["bins"].tolist() == [0, 3, 6, 9, 12]
  assert back["scalar"].shape == () and int(back["scalar"]) == 7
  assert back["fortran"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
  assert back["resid"][1].dtype == np.float32 and back["resid"][1][0] == np.float32(0.1)
  assert back["nested"] == {"a": [1, 2.5]}
  with pytest.raises(TypeError, match="cannot send a object"):
    dist._encode(object())


def test_merge_sums_rules():
  a = {"n": 3, "x": 0.1, "parts": [1.0, 1e-20], "bins": np.array([1, 2]), "k": "same"}
  b = {"n": 4, "x": 0.2, "parts": [2.0, -1e-20], "bins": np.array([10, 20]), "k": "same"}
  m = dist.merge_sums([a, b])
  assert m["n"] == 7 and m["x"] == math.fsum([0.1, 0.2]) and m["k"] == "same"
  assert m["parts"] == [1.0, 1e-20, 2.0, -1e-20]  # terms kept apart: the later fsum stays exact
  assert m["bins"].tolist() == [11, 22] and a["bins"].tolist() == [1, 2]  # inputs untouched
  with pytest.raises(dist.ProcessFailedError, match="different fields"):
    dist.merge_sums([{"a": 1}, {"b": 1}])
  with pytest.raises(dist.ProcessFailedError, match="different shapes"):
    dist.merge_sums([np.zeros(2), np.zeros(3)])
  with pytest.raises(dist.ProcessFailedError, match="disagree"):
    dist.merge_sums(["a", "b"])


def test_evaluate_across_processes_in_a_single_process_is_the_plain_result():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((300, 6)).astype(np.float32)
  labels = rng.integers(0, 6, 300)
  batches = [(logits[i : i + 70], labels[i : i + 70]) for i in range(0, 300, 70)]
  plain = xentjax.evaluate(batches, progress=False, across_processes=False)
  combined = xentjax.evaluate(batches, progress=False, across_processes=True)
  assert combined == plain


def test_evaluate_failure_in_a_single_process_job_is_raised_as_is():
  def failing():
    yield np.zeros((4, 3), np.float32), np.zeros(4, np.int64)
    raise OSError("disk vanished")

  with pytest.raises(OSError, match="disk vanished"):
    xentjax.evaluate(failing(), progress=False, across_processes=True)


def test_combined_totals_keep_their_types():
  import collections

  class Totals:
    def __init__(self):
      self.pairs = collections.defaultdict(list, {"nll": [np.float64(1.5), np.float64(0.0)]})
      self.counts = {"n": np.asarray(3, np.int64)}

  out = dist.combine_evaluation(Totals(), options={"top_k": 5}, failure=None)
  assert type(out) is Totals and isinstance(out.pairs, collections.defaultdict)
  assert out.pairs["nll"] == [1.5, 0.0] and out.pairs["missing"] == []
  assert int(out.counts["n"]) == 3
