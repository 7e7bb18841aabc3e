"""Display math wider than the text column, measured in headless Chromium.

A check of the built site (`tests/test_docs.py` runs it on the site CI built;
it needs Chromium: `apt-get install chromium`). Each HTML page with math is
copied with a script that waits for MathJax to typeset (and for xentjax.js to
set wide equations smaller), then reports every display equation: its TeX, the
width of its box (the text column), its natural width (at full size, before
xentjax.js scales it), the width of its content as shown and the font scale
xentjax.js gave it. The pages are loaded one after another in an iframe WIDTH
CSS pixels wide (headless Chromium makes no window narrower than 500 px; an
iframe is its own viewport), all in one browser per width. A line per page and
width is printed; OUT_JSON keeps every equation.

The exit status is 1 when an equation is wider than its column at a desktop
width (1024 px or more: the equations are broken over lines to fit there; only a
phone may set them smaller, then scroll), or a page gives no report; 0 otherwise.

usage: python docs/_tools/math_width.py docs/_build/html OUT_JSON [WIDTH ...]
       (default widths: 1280, a desktop, and 390, a phone; ONLY=text limits the pages)
"""

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DESKTOP = 1024  # from this width on, every equation must fit its column at full size
PROBE = r"""
<script>
(function waitForMathJax() {
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) { setTimeout(waitForMathJax, 100); return; }
  const done = (report) => { if (window.parent !== window) window.parent.postMessage(JSON.stringify(report), '*'); };
  MathJax.startup.promise.then(() => new Promise(r => setTimeout(r, 300))).then(() => {
    const items = [];
    for (const m of MathJax.startup.document.math) {
      if (!m.display) continue;
      const root = m.typesetRoot; if (!root) continue;
      const inner = root.querySelector('mjx-math') || root;
      const scale = inner.style.fontSize || '100%';
      const shown = inner.getBoundingClientRect().width;
      inner.style.fontSize = '';
      const natural = inner.getBoundingClientRect().width;
      inner.style.fontSize = scale === '100%' ? '' : scale;
      items.push({tex: m.math, box: root.clientWidth, natural, content: Math.max(root.scrollWidth, shown), scale});
    }
    done({viewport: window.innerWidth, items});
  }).catch(e => done({error: String(e)}));
})();
</script>
"""
# Loads the pages one after another in an iframe and writes their reports into
# <pre id="mathcheck"> (a page that sends none within 30 s is reported empty).
HOST = """<html><body style="margin:0"><script>
const pages = PAGES, reports = [];
let timer = null;
function next() {
  clearTimeout(timer);
  document.querySelectorAll("iframe").forEach(f => f.remove());
  if (reports.length === pages.length) {
    const pre = document.createElement("pre"); pre.id = "mathcheck";
    pre.textContent = JSON.stringify(reports); document.body.appendChild(pre); return;
  }
  const frame = document.createElement("iframe");
  Object.assign(frame, {src: pages[reports.length], width: WIDTH, height: 900});
  frame.style.border = "0";
  document.body.appendChild(frame);
  timer = setTimeout(() => { reports.push(null); next(); }, 30000);
}
window.addEventListener("message", e => { reports.push(JSON.parse(e.data)); next(); });
next();
</script></body></html>
"""


def copy_with_probe(site: Path, work: Path, only: str | None) -> list[Path]:
  """Copy the site into `work` with the probe in every page that has math; those pages."""
  shutil.copytree(site, work / "site")
  pages = []
  for page in sorted((work / "site").rglob("*.html")):
    if only and only not in str(page):
      continue
    text = page.read_text()
    if "math notranslate" in text or "\\[" in text or "\\(" in text or "$$" in text:
      page.write_text(text.replace("</body>", PROBE + "</body>"))
      pages.append(page)
  return pages


def measure(pages: list[Path], width: int, work: Path) -> list[dict | None]:
  """The report of each page at `width` CSS pixels (None for a page that sent none)."""
  host = work / f"host-{width}.html"
  urls = json.dumps([p.as_uri() for p in pages])
  host.write_text(HOST.replace("PAGES", urls).replace("WIDTH", str(width)))
  cmd = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--allow-file-access-from-files",
    f"--window-size={max(width, 500) + 40},950",
    f"--virtual-time-budget={40000 * len(pages)}",
    "--dump-dom",
    host.as_uri(),
  ]
  done = subprocess.run(
    cmd, check=False, capture_output=True, text=True, timeout=60 + 30 * len(pages)
  )
  m = re.search(r'<pre id="mathcheck"[^>]*>(.*?)</pre>', done.stdout, re.DOTALL)
  if not m:
    raise RuntimeError(f"chromium gave no report at {width} px:\n{done.stderr[-2000:]}")
  return json.loads(html.unescape(m[1]))


def main(argv: list[str]) -> int:
  site, out = Path(argv[0]), Path(argv[1])
  widths = [int(w) for w in argv[2:]] or [1280, 390]
  work = Path(tempfile.mkdtemp(prefix="xentjax-math-width-"))
  try:
    pages = copy_with_probe(site, work, os.environ.get("ONLY"))
    results, failures = [], []
    for width in widths:
      for page, rep in zip(pages, measure(pages, width, work), strict=True):
        rel = str(page.relative_to(work / "site"))
        rep = rep or {"error": "no report"}
        rep.update(page=rel, width=width)
        results.append(rep)
        items = rep.get("items", [])
        wide = [i for i in items if i["natural"] > i["box"] + 1]
        clipped = [i for i in items if i["content"] > i["box"] + 1]
        print(
          f"{width:5d} {rel:55s} display={len(items)} wider={len(wide)} "
          f"clipped={len(clipped)} {rep.get('error', '')}",
          flush=True,
        )
        if "error" in rep:
          failures.append(f"{rel} at {width} px: {rep['error']}")
        if width >= DESKTOP:
          failures += [
            f"{rel} at {width} px: {i['natural']:.0f} px wide in a {i['box']} px column: "
            + " ".join(i["tex"].split())[:120]
            for i in wide
          ]
  finally:
    shutil.rmtree(work)
  out.write_text(json.dumps(results, indent=1))
  for failure in failures:
    print("TOO WIDE:", failure)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
