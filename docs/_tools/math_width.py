"""Display math wider than the text column, measured in headless Chromium.

A maintainer's check of the built site (not part of CI: it needs Chromium,
`apt-get install chromium`). Each HTML page with math is copied with a script
that waits for MathJax to typeset (and for xentjax.js to set wide equations
smaller), then reports every display equation: its TeX, the width of its box,
the width of its content and the font scale xentjax.js gave it. The page is
loaded in an iframe WIDTH CSS pixels wide (headless Chromium makes no window
narrower than 500 px; an iframe is its own viewport). A line per page and width
is printed; OUT_JSON keeps every equation.

usage: python docs/_tools/math_width.py docs/_build/html OUT_JSON [WIDTH ...]
       (default widths: 1280, a desktop, and 390, a phone; ONLY=text limits the pages)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

site, out = Path(sys.argv[1]), Path(sys.argv[2])
widths = [int(w) for w in sys.argv[3:]] or [1280, 390]
probe = r"""
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
      items.push({tex: m.math, box: root.clientWidth, content: Math.max(root.scrollWidth, inner.getBoundingClientRect().width), scale: inner.style.fontSize || '100%'});
    }
    done({viewport: window.innerWidth, items});
  }).catch(e => done({error: String(e)}));
})();
</script>
"""
work = Path(tempfile.mkdtemp(prefix="xentjax-math-width-"))
shutil.copytree(site, work / "site")
pages = []
for page in sorted((work / "site").rglob("*.html")):
  text = page.read_text()
  if os.environ.get("ONLY") and os.environ["ONLY"] not in str(page):
    continue
  if "math notranslate" in text or "\\[" in text or "\\(" in text or "$$" in text:
    page.write_text(text.replace("</body>", probe + "</body>"))
    pages.append(page)
results = []
for width in widths:
  for page in pages:
    # The page in an iframe `width` CSS pixels wide: headless Chromium will not make a
    # window narrower than 500 px, an iframe is its own viewport (media queries included).
    host = work / f"host-{width}.html"
    host.write_text(
      f'<html><body style="margin:0"><iframe src="{page.as_uri()}" width="{width}" height="900" '
      'style="border:0"></iframe><script>window.addEventListener("message", e => {'
      ' const pre = document.createElement("pre"); pre.id = "mathcheck";'
      " pre.textContent = e.data; document.body.appendChild(pre); });</script></body></html>"
    )
    cmd = [
      "chromium",
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--no-first-run",
      f"--window-size={max(width, 500) + 40},950",
      "--virtual-time-budget=20000",
      "--dump-dom",
      host.as_uri(),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="mathcheck"[^>]*>(.*?)</pre>', done.stdout, re.DOTALL)
    rel = str(page.relative_to(work / "site"))
    if not m:
      results.append(
        {"page": rel, "width": width, "error": "no report", "stderr": done.stderr[-300:]}
      )
      continue
    import html

    rep = json.loads(html.unescape(m[1]))
    rep.update(page=rel, width=width)
    results.append(rep)
    clipped = [i for i in rep.get("items", []) if i["content"] > i["box"] + 1]
    print(
      f"{width:5d} {rel:55s} display={len(rep.get('items', []))} clipped={len(clipped)} {rep.get('error', '')}",
      flush=True,
    )
out.write_text(json.dumps(results, indent=1))
shutil.rmtree(work)
