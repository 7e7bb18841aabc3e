"""`xentjax explain`: print one cross-entropy calculation step by step.

From scores (`--logits`): score z -> exp(z) -> p = exp(z)/sum -> -ln p, then
the loss and the gradient p - y, as a table. From probabilities (`--probs`):
-ln q, the terms -y·ln q and their sum. The numbers come from JAX and the
library (`xentjax.cross_entropy_loss`, `xentjax.info`); this module parses,
validates, calls and prints.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import SupportsFloat

from xentjax.cli._common import CommandError, add_command

SUM_TOLERANCE = 1e-6

# argparse treats "-3.44" as a value (not an option) only when it matches its
# own negative-number pattern, which misses "-1e3", "-inf" and comma-separated
# lists ("-3.44,1.16,3.91"); this one covers them. Falls back to argparse's
# default if the attribute ever disappears.
_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf(inity)?"
_NEGATIVE_NUMBER = re.compile(rf"^-({_NUMBER})(,\s*[-+]?({_NUMBER}))*,?$", re.IGNORECASE)

_HELP = "print a cross-entropy calculation step by step"
_DESCRIPTION = (
  "Print the cross-entropy of one example as a table, step by step:\n"
  "from scores (--logits) through exp, the softmax probabilities and\n"
  "-ln p to the loss and the gradient p - y; or from probabilities\n"
  "(--probs) through the terms -y·log q to their sum. Give the true\n"
  "class with --label, or a (soft) target distribution with --target."
)
_EPILOG = """\
examples:
  xentjax explain --logits -3.44 1.16 3.91 --label 2 --classes dog cat panda
  xentjax explain --probs 0.228 0.619 0.153 --label 1
  xentjax explain --probs 0.1 0.5 0.1 0.1 0.2 --label 0 --base 2
  xentjax explain --logits 2 1 0 --target 0.7 0.2 0.1
"""


def register(subparsers) -> None:
  p = add_command(subparsers, "explain", help=_HELP, description=_DESCRIPTION, epilog=_EPILOG)
  p.add_argument(
    "--logits",
    nargs="+",
    metavar="Z",
    help="unnormalized scores, one per class, separated by spaces or commas "
    "(negative numbers are fine: --logits -3.44 1.16 3.91, --logits=-3.44,1.16,3.91)",
  )
  p.add_argument(
    "--probs",
    nargs="+",
    metavar="Q",
    help="predicted probabilities, one per class (spaces or commas), >= 0 and summing to 1",
  )
  p.add_argument(
    "--label", metavar="K", help="the true class: an index 0..K-1, or a name from --classes"
  )
  p.add_argument(
    "--target",
    nargs="+",
    metavar="Y",
    help="a target distribution instead of --label (one-hot or soft)",
  )
  p.add_argument(
    "--classes", nargs="+", metavar="NAME", help="optional class names (spaces or commas)"
  )
  p.add_argument(
    "--base",
    default="e",
    help="logarithm base: e (nats, default), 2 (bits), 10, or any number > 0, != 1",
  )
  if isinstance(getattr(p, "_negative_number_matcher", None), re.Pattern):
    p._negative_number_matcher = _NEGATIVE_NUMBER
  p.set_defaults(func=run)


# ----------------------------------------------------------------------------
# Parsing and validation: every problem is one CommandError line.


def _split_commas(flag: str, texts: list[str]) -> list[str]:
  """`1,2,3` and `1 2 3` (and `1, 2 3`) alike: one value per comma-separated item.

  An empty item (`1,,2`, `,1`, a comma at the very end) is an error, never
  silently dropped: it would change the number of classes. A comma that ends
  a word followed by another (`1, 2`) only separates the two.
  """
  items = []
  for j, text in enumerate(texts):
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and parts[-1] == "" and j < len(texts) - 1:
      parts.pop()  # "1," then "2": the comma separates
    if "" in parts:
      raise CommandError(
        f"{flag} has an empty entry in {' '.join(texts)!r}: give one value between each "
        "pair of commas"
      )
    items += parts
  return items


def _numbers(flag: str, texts: list[str]) -> list[float]:
  texts = _split_commas(flag, texts)
  values = []
  for text in texts:
    try:
      values.append(float(text))
    except ValueError:
      raise CommandError(f"{flag} takes numbers, got {text!r}") from None
  if any(math.isnan(v) for v in values):
    raise CommandError(f"{flag} contains NaN: {' '.join(texts)}")
  return values


def _check_distribution(flag: str, values: list[float]) -> None:
  for i, v in enumerate(values):
    if not 0.0 <= v <= 1.0:
      raise CommandError(f"{flag} must lie in [0, 1], got {v:g} at index {i}")
  total = math.fsum(values)
  if abs(total - 1.0) > SUM_TOLERANCE:
    raise CommandError(f"{flag} must sum to 1 (within {SUM_TOLERANCE:g}), got sum {total:.10g}")


def _parse_base(text: str) -> tuple[float | None, str, str]:
  """Return (base for the library, log symbol, unit)."""
  if text.strip().lower() == "e":
    return None, "ln", "nats"
  try:
    base = float(text)
  except ValueError:
    raise CommandError(f"--base must be e or a number > 0 and != 1, got {text!r}") from None
  if not base > 0 or base == 1 or math.isinf(base):
    raise CommandError(f"--base must be e or a number > 0 and != 1, got {text!r}")
  if base == math.e:
    return None, "ln", "nats"
  if base == 2:
    return 2.0, "log₂", "bits"
  if base == 10:
    return 10.0, "log₁₀", "hartleys"
  return base, f"log_{base:g}", f"base-{base:g} units"


def _parse_label(text: str, names: list[str]) -> int:
  k = len(names)
  if text in names and not text.lstrip("-").isdigit():
    return names.index(text)
  try:
    label = int(text)
  except ValueError:
    named = names != [str(i) for i in range(k)]
    choices = f" or one of the class names {', '.join(names)}" if named else ""
    raise CommandError(f"--label must be a class index 0..{k - 1}{choices}; got {text!r}") from None
  if not 0 <= label < k:
    raise CommandError(f"--label {label} is out of range for {k} classes (0..{k - 1})")
  return label


# ----------------------------------------------------------------------------
# Formatting.


def _fmt(x: SupportsFloat) -> str:
  """About 4 significant digits: 4 decimals in the usual range, else scientific."""
  x = float(x)
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf" if x > 0 else "-inf"
  if x == 0 or 1e-4 <= abs(x) < 1e5:
    text = f"{x:.4f}"
    return "0.0000" if text == "-0.0000" else text
  return f"{x:.3e}"


def _table(header: list[str], rows: list[list[str]], footer: list[str] | None = None) -> str:
  """Plain-text table: first column left-aligned, numbers right-aligned."""
  body = rows + ([footer] if footer else [])
  widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

  def line(cells):
    out = [cells[0].ljust(widths[0])]
    out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
    return "  ".join(out).rstrip()

  lines = [line(header), "  ".join("─" * w for w in widths)]
  lines += [line(r) for r in rows]
  if footer:
    lines.append(
      "  ".join("─" * w if footer[i] else " " * w for i, w in enumerate(widths)).rstrip()
    )
    lines.append(line(footer))
  return "\n".join(lines)


def _vector(values) -> str:
  return "[" + ", ".join(_fmt(v) for v in values) + "]"


# ----------------------------------------------------------------------------
# The two explanations.


def _what(label, names) -> str:
  if label is None:
    return "a soft target y"
  if names[label] == str(label):
    return f"label = {label}"
  return f"label = {names[label]} (class {label})"


def _explain_logits(z_list, y_list, label, names, base, log, unit) -> str:
  import jax
  import jax.numpy as jnp
  from jax.scipy.special import xlogy

  import xentjax

  scale = 1.0 if base is None else 1.0 / math.log(base)
  z = jnp.asarray(z_list, dtype=jnp.result_type(float))
  y = jnp.asarray(y_list, dtype=z.dtype)
  targets = jnp.asarray(label) if label is not None else y
  loss_fn = lambda v: xentjax.cross_entropy_loss(v, targets)
  loss, grad = jax.value_and_grad(loss_fn)(z)
  m = jnp.max(z)
  exp_z = jnp.exp(z)
  shifted = jnp.exp(z - m)
  lse = jax.nn.logsumexp(z)
  p = jax.nn.softmax(z)
  neg_log_p = -jax.nn.log_softmax(z) * scale
  terms = -xlogy(y, p) * scale

  overflow = not bool(jnp.all(jnp.isfinite(exp_z[jnp.isfinite(z)])))
  e_col, e_vals = ("exp(z − m)", shifted) if overflow else ("exp(z)", exp_z)
  soft = label is None
  header = ["class", "score z", e_col, "p = exp/Σ", f"−{log} p", "target y"]
  header += [f"−y·{log} p"] if soft else []
  header += ["ŷ − y"]
  rows = []
  for i, name in enumerate(names):
    row = [name, _fmt(z[i]), _fmt(e_vals[i]), _fmt(p[i]), _fmt(neg_log_p[i])]
    row += [_fmt(y[i]) if soft else str(int(y_list[i]))]
    row += [_fmt(terms[i])] if soft else []
    row += [_fmt(grad[i])]
    rows.append(row)
  footer = ["Σ", "", _fmt(jnp.sum(e_vals)), _fmt(jnp.sum(p)), ""]
  footer += [_fmt(jnp.sum(y)) if soft else "1"]
  footer += [_fmt(jnp.sum(terms))] if soft else []
  footer += [""]

  out = [f"Cross-entropy from scores (logits): {len(names)} classes, {_what(label, names)}", ""]
  out.append(_table(header, rows, footer))
  out.append("")
  if overflow:
    out.append("exp(z) overflows here, so the table shows exp(z − m); p is the same.")
  out.append(
    f"log-sum-exp trick: m = max z = {_fmt(m)}; ln Σ exp(z) = m + ln Σ exp(z − m) "
    f"= {_fmt(m)} + ln {_fmt(jnp.sum(shifted))} = {_fmt(lse)}"
  )
  out.append("  (subtracting m first keeps exp from overflowing; then −ln p = ln Σ exp(z) − z)")
  loss_b = float(loss) * scale
  if not soft:
    out += _label_loss_lines(names[label], lse, z[label], loss, loss_b, base, log, unit)
  else:
    out += _soft_target_lines(y, p, "p", loss_b, base, log, unit)
  note = "" if base is None else f"; in nats: divide by ln {base:g} for {unit}"
  out.append(f"gradient ∂loss/∂z = ŷ − y with ŷ = p: {_vector(grad)}{note}")
  return "\n".join(out)


def _minus(a, b) -> str:
  """``a − b`` written without a double sign: ``a + |b|`` when ``b`` is negative."""
  b = float(b)
  return f"{_fmt(a)} + {_fmt(-b)}" if b < 0 else f"{_fmt(a)} − {_fmt(b)}"


def _plus(a, b) -> str:
  """``a + b`` written without a double sign: ``a − |b|`` when ``b`` is negative."""
  b = float(b)
  return f"{_fmt(a)} − {_fmt(-b)}" if b < 0 else f"{_fmt(a)} + {_fmt(b)}"


def _paren(x) -> str:
  """A number after an operator: in parentheses when negative (``/ (−0.6931)``)."""
  return f"({_fmt(x)})" if float(x) < 0 else _fmt(x)


def _label_loss_lines(name, lse, z_label, loss, loss_b, base, log, unit) -> list[str]:
  """The loss of a class label: log-sum-exp minus the label's score (nats, then `base`)."""
  in_nats = f"ln Σ exp(z) − z[{name}] = {_minus(lse, z_label)}"
  if base is None:
    return [f"loss = −ln p[{name}] = {in_nats} = {_fmt(loss)} nats"]
  return [
    (
      f"loss = −{log} p[{name}] = ({in_nats}) / ln {base:g} "
      f"= {_fmt(loss)} / {_paren(math.log(base))} = {_fmt(loss_b)} {unit}"
    )
  ]


def _soft_target_lines(y, pred, sym, loss, base, log, unit) -> list[str]:
  """The loss of a soft target split as H(y) + KL(y || pred)."""
  import xentjax

  h = xentjax.info.entropy(y, base=base)
  kl = xentjax.info.kl_divergence(y, pred, base=base)
  return [
    f"loss = −Σ y·{log} {sym} = {_fmt(loss)} {unit}",
    (f"     = H(y) + KL(y‖{sym}) = {_plus(h, kl)} (entropy of y + the excess training can remove)"),
  ]


def _explain_probs(q_list, y_list, label, names, base, log, unit) -> str:
  import jax.numpy as jnp
  from jax.scipy.special import xlogy

  import xentjax

  scale = 1.0 if base is None else 1.0 / math.log(base)
  q = jnp.asarray(q_list, dtype=jnp.result_type(float))
  y = jnp.asarray(y_list, dtype=q.dtype)
  neg_log_q = -jnp.log(q) * scale
  terms = -xlogy(y, q) * scale
  loss = xentjax.info.cross_entropy(y, q, base=base)

  soft = label is None
  header = ["class", "q", f"−{log} q", "target y", f"−y·{log} q"]
  rows = []
  for i, name in enumerate(names):
    rows.append(
      [
        name,
        _fmt(q[i]),
        _fmt(neg_log_q[i]),
        _fmt(y[i]) if soft else str(int(y_list[i])),
        _fmt(terms[i]),
      ]
    )
  footer = ["Σ", _fmt(jnp.sum(q)), "", _fmt(jnp.sum(y)) if soft else "1", _fmt(jnp.sum(terms))]

  out = [f"Cross-entropy from probabilities: {len(names)} classes, {_what(label, names)}", ""]
  out.append(_table(header, rows, footer))
  out.append("")
  out.append(f"terms with y = 0 are 0 (0·{log} q = 0), so only the target's classes count")
  if not soft:
    out.append(
      f"loss = −Σ y·{log} q = −{log} q[{names[label]}] = −{log} {_fmt(q[label])} "
      f"= {_fmt(loss)} {unit}"
    )
  else:
    out += _soft_target_lines(y, q, "q", loss, base, log, unit)
  out.append(f"if q = softmax(z), the gradient ∂loss/∂z (in nats) is q − y = {_vector(q - y)}")
  return "\n".join(out)


def _float64():
  """Compute the explanation in float64 (the printed digits are then exact).

  A context manager, so the process-wide JAX setting stays as it was.
  """
  import jax

  enable = getattr(jax, "enable_x64", None)
  if enable is None:  # older JAX
    enable = getattr(jax.experimental, "enable_x64", None)
  return enable(True) if enable is not None else contextlib.nullcontext()


def run(args) -> int:
  if (args.logits is None) == (args.probs is None):
    raise CommandError("give exactly one of --logits or --probs")
  if (args.label is None) == (args.target is None):
    raise CommandError("give exactly one of --label or --target")
  from_logits = args.logits is not None
  flag = "--logits" if from_logits else "--probs"
  values = _numbers(flag, args.logits if from_logits else args.probs)
  k = len(values)
  if from_logits:
    if any(v == math.inf for v in values):
      raise CommandError("--logits must not contain +inf")
    if all(v == -math.inf for v in values):
      raise CommandError("--logits are all -inf: no class has any probability")
  else:
    _check_distribution("--probs", values)
  names = [str(i) for i in range(k)]
  if args.classes is not None:
    classes = _split_commas("--classes", args.classes)
    if len(classes) != k:
      raise CommandError(f"--classes names {len(classes)} classes but {flag} has {k} values")
    if len(set(classes)) != k:
      raise CommandError(f"--classes must be distinct, got {' '.join(classes)}")
    names = classes
  if args.label is not None:
    label = _parse_label(args.label, names)
    target = [1.0 if i == label else 0.0 for i in range(k)]
  else:
    label = None
    target = _numbers("--target", args.target)
    if len(target) != k:
      raise CommandError(f"--target has {len(target)} values but {flag} has {k}")
    _check_distribution("--target", target)
  base, log, unit = _parse_base(args.base)
  explain = _explain_logits if from_logits else _explain_probs
  with _float64():
    text = explain(values, target, label, names, base, log, unit)
  print(text)
  return 0
