"""The committed notebooks' printed outputs: no negative zeros, conventions said as such."""

import json
import pathlib
import re

import pytest

NOTEBOOKS = sorted(
  (pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("[0-9][0-9]_*.ipynb")
)
# "-0.0000", "-0.0" (not "-0.0001"): a negative zero printed as a number.
NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0\.0+(?![0-9]*[1-9])(?![\d.])")


def printed(path):
  cells = json.loads(path.read_text())["cells"]
  return "".join(
    "".join(out.get("text", ""))
    for cell in cells
    if cell["cell_type"] == "code"
    for out in cell.get("outputs", [])
  )


def test_the_pattern_finds_negative_zeros_only():
  assert NEGATIVE_ZERO.search("H = -0.0000 bits") and NEGATIVE_ZERO.search("x -0.0")
  assert not NEGATIVE_ZERO.search("-0.0001 0.0000 -10.0000 -0.05 1e-0.0x")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_prints_a_negative_zero(path):
  text = printed(path)
  assert text, f"{path.name} has no printed output"
  assert not NEGATIVE_ZERO.search(text), NEGATIVE_ZERO.search(text).group(0)


def test_notebook_01_says_the_gradient_at_zero_is_a_convention():
  path = next(p for p in NOTEBOOKS if p.name.startswith("01_"))
  text = printed(path)
  assert "dH/dp at (1/2, 1/2, 0)" in text
  assert "+inf at p = 0; 0 is the library's convention" in text
  cells = json.loads(path.read_text())["cells"]
  markdown = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
  assert "true derivative at $p = 0$ is $+\\infty$" in markdown
