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
