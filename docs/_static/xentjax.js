// Long identifiers in table cells and the page's table of contents
// (`xentjax.softmax_cross_entropy_with_integer_labels`) may wrap after a `.` or
// `_` instead of anywhere: add a <wbr> break opportunity there (copying the text
// is unchanged). A table's first column names the row and keeps its names whole.
document.addEventListener("DOMContentLoaded", () => {
  const spans = document.querySelectorAll(
    ".bd-article table td:not(:first-child) code span.pre, .bd-sidebar-secondary code span.pre");
  for (const span of spans) {
    if (!/[._]/.test(span.textContent) || span.children.length) continue;
    const parts = span.textContent.split(/(?<=[._])/);
    span.textContent = "";
    parts.forEach((part, i) => {
      if (i) span.appendChild(document.createElement("wbr"));
      span.appendChild(document.createTextNode(part));
    });
  }
});

// Display math wider than the text column (a phone's, mostly: the equations are
// broken over lines to fit the desktop column) is set smaller until it fits, down
// to 70% of MathJax's size (about the body text's size: MathJax enlarges math by a
// quarter). What is still wider scrolls sideways (xentjax.css). Runs once MathJax
// has typeset the page, and again when the window is resized.
function fitDisplayMath() {
  for (const box of document.querySelectorAll('mjx-container[display="true"]')) {
    const math = box.querySelector("mjx-math");
    if (!math) continue;
    math.style.fontSize = "";
    const ratio = box.clientWidth / box.scrollWidth;
    if (ratio < 1) math.style.fontSize = `${Math.max(0.7, ratio) * 100}%`;
  }
}
(function whenTypeset(tries) {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(fitDisplayMath);
    window.addEventListener("resize", fitDisplayMath);
  } else if (tries > 0) {
    setTimeout(() => whenTypeset(tries - 1), 100);  // MathJax loads after this script
  }
})(100);
