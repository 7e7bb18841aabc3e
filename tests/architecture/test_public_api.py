"""The one convention for public functions (`xentjax._api`): compilation, inputs, options, masks.

Every public function of the listed modules must be declared with
`xentjax._api.public`: a plain Python function (its own name, docstring and
signature for `help()`), compiled, taking anything `numpy.asarray` takes, with
options validated by name and one `where` rule.
"""

import dataclasses
import functools
import inspect
import pydoc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax as L
from xentjax import _api
from xentjax import grads as G


class Frame:
  """A stand-in for a pandas DataFrame / xarray DataArray: only `__array__`."""

  def __init__(self, values):
    self._values = np.asarray(values)

  def __array__(self, dtype=None, copy=None):
    return self._values if dtype is None else self._values.astype(dtype)


# Public functions of the modules that follow the convention (by name).
SOFTMAX_FAMILY = [
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "safe_softmax_cross_entropy",
  "poly_loss_cross_entropy",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "cross_entropy_loss",
]
METRICS = [
  "accuracy",
  "correct",
  "top_k_accuracy",
  "top_k_correct",
  "cross_entropy_rate",
  "perplexity",
  "bits_per_token",
]


def _public_functions():
  out = [(name, getattr(L, name)) for name in SOFTMAX_FAMILY]
  out += [(f"metrics.{name}", getattr(L.metrics, name)) for name in METRICS]
  out += [(f"grads.{name}", getattr(G, name)) for name in SOFTMAX_FAMILY[:6]]
  return out


@pytest.mark.parametrize("name,fn", _public_functions(), ids=[n for n, _ in _public_functions()])
def test_public_functions_keep_their_face(name, fn):
  assert inspect.isfunction(fn), f"{name} is a {type(fn).__name__}, not a function"
  assert _api.is_public(fn)
  short = name.split(".")[-1]
  # A closed-form gradient keeps its own name (stack traces, profiles); `grads`
  # only collects it under the loss's name.
  assert fn.__name__ == (f"{short}_grad" if name.startswith("grads.") else short)
  assert fn.__doc__ and fn.__doc__.strip()
  text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
  assert "PjitFunction" not in text and f"function {fn.__name__}" in text
  if name.startswith("grads."):  # a closed-form gradient takes its loss's arguments
    assert fn.__module__ != "xentjax.grads" and fn.__qualname__ == fn.__name__
    assert inspect.signature(fn) == inspect.signature(getattr(L, short))
  else:
    assert inspect.signature(fn) == inspect.signature(inspect.unwrap(fn))


def test_array_likes_are_accepted_everywhere():
  z = [[0.5, -1.0, 2.0], [1.0, 1.0, 0.0]]
  y = [2, 0]
  # A list of floats is float64 under JAX_ENABLE_X64=1: compare to float32 rounding.
  expected = np.asarray(L.softmax_cross_entropy_with_integer_labels(np.float32(z), np.int32(y)))
  close = {"rtol": 1e-6}
  for zz, yy in ((z, y), (tuple(map(tuple, z)), tuple(y)), (Frame(np.float32(z)), Frame(y))):
    per = L.softmax_cross_entropy_with_integer_labels(zz, yy)
    np.testing.assert_allclose(per, expected, **close)
    np.testing.assert_allclose(L.cross_entropy_loss(zz, yy, reduction="none"), expected, **close)
    np.testing.assert_allclose(L.metrics.cross_entropy_rate(zz, yy), expected.mean(), **close)
  onehot = Frame(np.eye(3, dtype=np.float32)[y])
  np.testing.assert_allclose(L.softmax_cross_entropy(Frame(np.float32(z)), onehot), expected)
  np.testing.assert_allclose(G.softmax_cross_entropy(Frame(np.float32(z)), onehot).shape, (2, 3))


def test_list_axis_is_a_tuple():
  z = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 10
  y = np.full((2, 3, 4), 1 / 12, np.float32)
  np.testing.assert_allclose(
    L.softmax_cross_entropy(z, y, axis=[1, 2]), L.softmax_cross_entropy(z, y, axis=(1, 2))
  )


@pytest.mark.parametrize(
  "call,error,match",
  [
    (lambda z, y: L.metrics.cross_entropy_rate(z, y, base="bits"), TypeError, "`base`"),
    (lambda z, y: L.metrics.cross_entropy_rate(z, y, base=jnp.array(2.0)), TypeError, "`base`"),
    (lambda z, y: L.metrics.perplexity(z, y, base=1.0), ValueError, "`base`"),
    (
      lambda z, y: L.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing="0.1"),
      TypeError,
      "`label_smoothing`",
    ),
    (
      lambda z, y: L.cross_entropy_loss(z, y, label_smoothing=1.5),
      ValueError,
      "`label_smoothing`",
    ),
    (lambda z, y: L.cross_entropy_loss(z, y, reduction="avg"), ValueError, "`reduction`"),
    (lambda z, y: L.cross_entropy_loss(z, y, ignore_index=1.5), TypeError, "`ignore_index`"),
    (
      lambda z, y: L.softmax_cross_entropy_with_integer_labels(z, y, z_loss=-1.0),
      ValueError,
      "`z_loss`",
    ),
    (lambda z, y: L.metrics.top_k_accuracy(z, y, k=2.0), TypeError, "`k`"),
    (lambda z, y: L.metrics.top_k_accuracy(z, y, k=7), ValueError, "`k`"),
    (lambda z, y: L.softmax_cross_entropy_with_integer_labels(z, y, "a"), TypeError, "`axis`"),
  ],
)
def test_options_are_validated_by_name(call, error, match):
  z = np.zeros((2, 3), np.float32)
  y = np.array([0, 1])
  with pytest.raises(error, match=match):
    call(z, y)


def test_where_rule_bool_and_integer_masks_floats_rejected():
  z = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
  y = np.array([0, 2, 1])
  keep = np.array([True, False, True])
  for fn in (L.metrics.cross_entropy_rate, L.metrics.accuracy):
    want = fn(z[keep], y[keep])
    np.testing.assert_allclose(fn(z, y, where=keep), want, rtol=1e-6)
    np.testing.assert_allclose(fn(z, y, where=keep.astype(np.int32)), want, rtol=1e-6)
    np.testing.assert_allclose(fn(z, y, where=[1, 0, 1]), want, rtol=1e-6)
    with pytest.raises(TypeError, match=r"`where` must be a boolean mask.*weight"):
      fn(z, y, where=keep.astype(np.float32))
  per = L.softmax_cross_entropy_with_integer_labels
  np.testing.assert_allclose(per(z, y, where=keep), per(z, y, where=keep.astype(np.uint8)))
  with pytest.raises(TypeError, match="`where` must be a boolean mask"):
    per(z, y, where=keep.astype(np.float32))


def _row_logprob(z, label):
  """A row function for `linear_row_loss` (defined once: it is static)."""
  return jax.nn.log_softmax(z)[label]


def _where_cases():
  """Arguments of every public function with a `where`, and a row mask of the right shape."""
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 3)).astype(np.float32)
  y = np.array([0, 2, 1, 2], np.int32)
  soft = np.eye(3, dtype=np.float32)[y]
  q = np.array([[0.2, 0.3, 0.5]] * 4, np.float32)
  u = np.full((4, 3), 1 / 3, np.float32)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  rows = np.array([True, False, True, True])
  col = rows[:, None]  # the info functions mask elements: broadcast over classes
  logits_int = ((z, y), rows)
  logits_soft = ((z, soft), rows)
  y_miss = y.copy()
  y_miss[1] = np.argmax(z[1])  # the masked row is a hit, another row a miss
  y_miss[3] = np.argmin(z[3])
  top_k = ((z, y_miss, 2), rows)
  fused = ((x, w, y), rows)
  return {
    "categorical_cross_entropy": ((q, soft), rows),
    "categorical_cross_entropy_with_integer_labels": ((q, y), rows),
    "categorical_focal_cross_entropy": ((q, soft), rows),
    "contrastive_loss": ((x, 0.5 * x + 0.1), rows),
    "cosine_distance": ((z, z * 0.5 + 1), rows),
    "cosine_similarity": ((z, z * 0.5 + 1), rows),
    "kl_divergence": ((z, soft * 0.9 + 0.1 / 3), rows),
    "kl_divergence_with_log_targets": ((z, np.log(q)), rows),
    "linear_distillation_loss": ((x, w, x, 0.5 * w), rows),
    "linear_row_loss": ((_row_logprob, x, w, {"label": y}), rows),
    "linear_sequence_logprobs": ((x, w, y, np.array([0, 1, 0, 1])), rows, {"num_segments": 2}),
    "linear_softmax_cross_entropy": fused,
    "linear_token_stats": fused,
    "linear_topk_distillation_loss": ((x, w, y[:, None], np.zeros((4, 1), np.float32)), rows),
    "nll_loss": ((np.log(q), y), rows),
    "poly_loss_cross_entropy": logits_soft,
    "sigmoid_contrastive_loss": ((x, 0.5 * x + 0.1), rows),
    "smooth_labels": ((soft, 0.1), rows),
    "softmax_cross_entropy": logits_soft,
    "softmax_cross_entropy_with_integer_labels": logits_int,
    "softmax_focal_loss": logits_soft,
    "info.cross_entropy": ((q, u), col),
    "info.entropy": ((q,), col),
    "info.information": ((q,), col),
    "info.js_divergence": ((q, u), col),
    "info.kl_divergence": ((q, u), col),
    "info.kl_divergence_from_logits": ((z, 0.5 * z), col),
    "metrics.accuracy": logits_int,
    "metrics.bits_per_token": logits_int,
    "metrics.correct": logits_int,
    "metrics.cross_entropy_rate": logits_int,
    "metrics.perplexity": logits_int,
    "metrics.top_k_accuracy": top_k,
    "metrics.top_k_correct": top_k,
    "calibration.adaptive_calibration_error": logits_int,
    "calibration.bootstrap": (
      (L.calibration.expected_calibration_error, z, y),
      rows,
      {"n": 8, "key": jax.random.key(0)},
    ),
    "calibration.brier_score": logits_int,
    "calibration.expected_calibration_error": logits_int,
    "calibration.fit": ((z, y, "vector"), rows),
    "calibration.fit_temperature": logits_int,
    "calibration.maximum_calibration_error": logits_int,
    "calibration.smooth_ece": logits_int,
    "calibration.reliability_diagram": logits_int,
    "calibration.temperature_statistics": ((z, y, np.array([0.0, 0.5], np.float32)), rows),
    "policy.policy_gradient_loss": ((np.log(q), z[:, 0]), col),
  }


def _functions_with_where():
  names = []
  for prefix in ("", "info.", "metrics.", "calibration.", "policy."):
    module = _resolve(prefix[:-1]) if prefix else L
    for name in module.__all__:
      fn = getattr(module, name)
      if inspect.isfunction(fn) and "where" in inspect.signature(fn).parameters:
        names.append(prefix + name)
  return names


def test_every_function_with_where_is_checked():
  assert sorted(_functions_with_where()) == sorted(_where_cases())


def _leaves(result):
  if dataclasses.is_dataclass(result):  # calibration.ReliabilityDiagram
    result = [getattr(result, f.name) for f in dataclasses.fields(result)]
  leaves = [a for a in jax.tree_util.tree_leaves(result) if not isinstance(a, str)]
  return [np.asarray(a, np.float64) for a in leaves]


@pytest.mark.parametrize("name", sorted(_where_cases()))
def test_one_where_rule_everywhere(name):
  fn = _resolve(name)
  args, keep, *kw = _where_cases()[name]
  fn = functools.partial(fn, **kw[0]) if kw else fn  # keyword-only arguments it needs
  want = _leaves(fn(*args, where=keep))
  for mask in (keep.astype(np.int32), keep.astype(np.uint8), keep.astype(np.int32).tolist()):
    got = _leaves(fn(*args, where=mask))
    for a, b in zip(got, want, strict=True):
      np.testing.assert_array_equal(a, b)
  # The mask matters (so the comparison above could fail).
  other = _leaves(fn(*args, where=np.ones_like(keep)))
  assert any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(other, want, strict=True))
  with pytest.raises(TypeError, match=r"`where` must be a boolean mask.*weight"):
    fn(*args, where=keep.astype(np.float32))


def test_evaluate_masks_follow_the_where_rule():
  z = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 1.0]], np.float32)
  y = np.array([0, 0, 1])
  keep = np.array([True, False, True])
  want = L.evaluate([(z, y, keep)], progress=False)
  got = L.evaluate([(z, y, keep.astype(np.int8))], progress=False)
  assert got.cross_entropy == want.cross_entropy and got.count == want.count == 2
  with pytest.raises(TypeError, match=r"`mask` must be a boolean mask.*weight"):
    L.evaluate([(z, y, keep.astype(np.float32))], progress=False)


def test_equal_options_share_one_compiled_program():
  z = np.zeros((2, 3), np.float32)
  y = np.array([0, 1])
  fn = L.softmax_cross_entropy_with_integer_labels
  a = fn(z, y, label_smoothing=0.25)
  b = fn(z, y, label_smoothing=np.float32(0.25))
  np.testing.assert_array_equal(a, b)
  assert _api.OPTIONS["label_smoothing"](np.float32(0.25)) == 0.25
  assert type(_api.OPTIONS["label_smoothing"](np.float32(0.25))) is float


def test_public_rejects_unknown_static_names():
  with pytest.raises(TypeError, match="no parameter"):

    @_api.public(("nope",))
    def f(x):
      return x


# Gradients declared beside their loss with `public_like` (their own name and docstring).
GRADIENTS_LIKE = [
  "softmax_focal_loss",
  "categorical_cross_entropy",
  "binary_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "sigmoid_focal_loss",
]


@pytest.mark.parametrize("name", GRADIENTS_LIKE)
def test_gradients_declared_like_their_loss(name):
  grad, loss = getattr(G, name), getattr(L, name)
  assert inspect.isfunction(grad) and grad.__name__ == f"{name}_grad"
  assert inspect.signature(grad) == inspect.signature(loss)
  assert grad.static_argnames == loss.static_argnames
  assert grad.__doc__.startswith(f"Gradient of `xentjax.{name}`")
  text = pydoc.render_doc(grad, renderer=pydoc.plaintext)
  assert f"{name}_grad(logits" in text or f"{name}_grad(probs" in text
  # A wrong call fails like a call of the loss.
  with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
    grad(np.zeros(3, np.float32), np.zeros(3, np.float32), nope=1)


# Public functions with the arguments of another, declared with `public_like`.
DECLARED_LIKE = [
  ("info.kl_divergence", "info.cross_entropy"),
  ("info.js_divergence", "info.cross_entropy"),
  ("cosine_distance", "cosine_similarity"),
]


def _resolve(dotted):
  obj = L
  for part in dotted.split("."):
    obj = getattr(obj, part)
  return obj


@pytest.mark.parametrize("name,model", DECLARED_LIKE, ids=[n for n, _ in DECLARED_LIKE])
def test_functions_declared_like_another_show_its_arguments(name, model):
  fn, model = _resolve(name), _resolve(model)
  assert inspect.isfunction(fn) and fn.__name__ == name.split(".")[-1]
  assert inspect.signature(fn) == inspect.signature(model)
  assert fn.static_argnames == model.static_argnames
  text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
  assert f"{fn.__name__}({next(iter(inspect.signature(model).parameters))}" in text
  assert "=-1" in text.replace(" ", "")  # the defaults are shown, not bare names
  a = np.array([0.25, 0.75], np.float32)
  with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
    fn(a, a, nope=1)
  with pytest.raises(TypeError, match="`axis` must be an int"):
    fn(a, a, axis=1.5)


def test_maximum_calibration_error_takes_the_adaptive_ones_arguments():
  # Declared with `public_like(adaptive_calibration_error)`: the same face, options and checks.
  fn = L.calibration.maximum_calibration_error
  model = L.calibration.adaptive_calibration_error
  assert inspect.isfunction(fn) and fn.__name__ == "maximum_calibration_error"
  assert inspect.signature(fn) == inspect.signature(model)
  assert fn.static_argnames == model.static_argnames == ("num_bins",)
  text = pydoc.render_doc(fn, renderer=pydoc.plaintext).replace(" ", "")
  assert "maximum_calibration_error(logits" in text and "'int'=15,where" in text
  assert "{" + "binned_args}" not in fn.__doc__ and "num_bins: keyword-only" in fn.__doc__
  z, y = np.zeros((2, 3), np.float32), np.array([0, 1])
  with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
    fn(z, y, nope=1)
  with pytest.raises(TypeError, match="positional"):
    fn(z, y, 10)  # `num_bins` stays keyword-only
  with pytest.raises(ValueError, match="`num_bins` must be a positive int"):
    fn(z, y, num_bins=0)


def test_public_like_takes_the_model_arguments_by_name():
  @_api.public(("n",))
  def model(x, y=2.0, *, n=1):
    return x * y * n

  @_api.public_like(model)
  def like(x, y, n):
    return x + y + n

  assert inspect.signature(like) == inspect.signature(model)
  assert like.static_argnames == ("n",)
  assert float(like(1.0)) == 4.0 and float(like(1.0, 3.0, n=5)) == 9.0
  with pytest.raises(TypeError, match="`n` is a compile-time option"):
    like(1.0, n=[1])


def test_doc_parts_fill_placeholders_and_refuse_missing_ones():
  @_api.doc_parts(args="x: a number.\n    y: another.")
  def f(x, y):
    """Sum.

    Args:
      {args}
    """

  assert f.__doc__ == "Sum.\n\n    Args:\n      x: a number.\n    y: another.\n    "
  with pytest.raises(ValueError, match=r"has no {args}"):

    @_api.doc_parts(args="x")
    def g(x):
      """No placeholder."""


def test_no_public_docstring_keeps_a_placeholder():
  for mod in (L, L.info, L.metrics, G):
    for name in mod.__all__:
      doc = getattr(getattr(mod, name), "__doc__", None) or ""
      for marker in ("{pair_options}", "{multiclass_args}"):
        assert marker not in doc, f"{mod.__name__}.{name}"


def test_package_declares_its_public_names_and_types():
  import pathlib

  public = {n for n in vars(L) if not n.startswith("_")}
  assert set(L.__all__) == public
  assert (pathlib.Path(L.__file__).parent / "py.typed").is_file()


# The fused functions: their own keywords, then the head keywords, each written out.
FUSED = {
  "linear_sequence_logprobs": {},
  "linear_softmax_cross_entropy": {},
  "linear_token_stats": {},
  "linear_distillation_loss": {"data_axis": "data", "vocab_axis": "vocab"},
  "linear_topk_distillation_loss": {"data_axis": "data", "vocab_axis": "vocab"},
}
HEAD_KEYWORDS = [
  "w_layout",
  "vocab_size",
  "token_chunk_size",
  "vocab_chunk_size",
  "precision",
  "mesh",
  "data_axis",
  "vocab_axis",
]


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_functions_spell_out_their_head_keywords(name):
  fn = getattr(L, name)
  assert inspect.signature(inspect.unwrap(fn)) == inspect.signature(fn)  # written out, not made
  params = inspect.signature(fn).parameters
  kinds = {p.kind for p in params.values()}
  assert (
    inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
  )
  # The head keywords close the signature, in this order, with these defaults.
  assert list(params)[-len(HEAD_KEYWORDS) :] == HEAD_KEYWORDS
  defaults = {"w_layout": "dv", **dict.fromkeys(HEAD_KEYWORDS[1:], None), **FUSED[name]}
  for key in HEAD_KEYWORDS:
    assert params[key].kind is inspect.Parameter.KEYWORD_ONLY
    assert params[key].default == defaults[key], key
    assert key in fn.__doc__, f"{name} does not document {key}"
  text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
  assert "vocab_chunk_size: 'int | None' = None" in text and "**" not in text.split(")")[0]


@pytest.mark.parametrize("name", ["linear_softmax_cross_entropy", "linear_token_stats"])
def test_parallel_functions_take_every_keyword_of_the_single_device_one(name):
  single = inspect.signature(getattr(L, name)).parameters
  placed = inspect.signature(getattr(L.parallel, name)).parameters
  placement = ["mesh", "data_axis", "vocab_axis"]
  # x, w, labels, then the placement (mesh required), then the other keywords in order.
  assert list(placed)[:6] == ["x", "w", "labels", *placement]
  assert placed["mesh"].default is inspect.Parameter.empty
  assert (placed["data_axis"].default, placed["vocab_axis"].default) == ("data", "vocab")
  rest = [k for k in single if k not in placement]
  assert list(placed)[6:] == rest[3:]
  for k in rest:
    assert placed[k].default == single[k].default, k
    assert placed[k].annotation == single[k].annotation, k
    assert placed[k].kind is single[k].kind, k
  for k in rest[3:]:
    assert k in getattr(L.parallel, name).__doc__, f"parallel.{name} does not document {k}"


def _fused_args(name):
  x = np.ones((2, 3), np.float32)
  w = np.zeros((3, 5), np.float32)
  y = np.array([1, 4], np.int32)
  if name == "linear_distillation_loss":
    return x, w, x, w
  if name == "linear_topk_distillation_loss":
    return x, w, np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32)
  if name == "linear_sequence_logprobs":
    return x, w, y, np.zeros(2, np.int32)
  return x, w, y


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_functions_bind_calls_like_python(name):
  # Declared with `public`, they bind a call to their signature like every public function.
  fn = getattr(L, name)
  args = _fused_args(name)
  required = {"num_segments": 1} if name == "linear_sequence_logprobs" else {}
  with pytest.raises(TypeError, match="got an unexpected keyword argument 'nope'"):
    fn(*args, nope=1, **required)
  with pytest.raises(TypeError, match="too many positional arguments"):
    fn(*args, None, None, None)
  with pytest.raises(TypeError, match="missing a required argument: 'w'"):
    fn(*args[:1])


def test_head_keywords_reach_the_implementation():
  # vocab_size=3 keeps 3 of the 5 zero logits: log 3, against log 5 by default.
  x, w, y = _fused_args("linear_softmax_cross_entropy")
  y = np.array([0, 2], np.int32)
  np.testing.assert_allclose(float(L.linear_softmax_cross_entropy(x, w, y)), np.log(5), rtol=1e-6)
  got = L.linear_softmax_cross_entropy(x, w, y, vocab_size=3)
  np.testing.assert_allclose(float(got), np.log(3), rtol=1e-6)
  stats = L.linear_token_stats(x, w.T, y, w_layout="vd", vocab_size=3)
  np.testing.assert_allclose(np.asarray(stats.entropy), np.log(3), rtol=1e-6)
  # jax.jit reads the spelled-out signature for static_argnames.
  jitted = jax.jit(L.linear_softmax_cross_entropy, static_argnames=("vocab_size",))
  np.testing.assert_allclose(float(jitted(x, w, y, vocab_size=3)), np.log(3), rtol=1e-6)
