"""The benchmarks' copies of engine constants agree with the engine."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_benchmarks_filter_tile_is_the_engines():
  sys.path.insert(0, str(ROOT))
  try:
    from benchmarks import _common
  finally:
    sys.path.remove(str(ROOT))
  from xentjax._vocab import tiles

  assert (tiles.FILTER_TOKEN_CHUNK, tiles.FILTER_VOCAB_CHUNK) == _common.FILTER_TILE
  assert (tiles.FILTER_TOKEN_CHUNK, tiles.STORE_FILTER_VOCAB_CHUNK) == _common.STORE_FILTER_TILE
