"""Tests for the optax training pieces in `xentjax.train`."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xentjax as L
from xentjax import datasets, train

# One shared optimizer object: `fit` caches its compiled epoch per (loss,
# optimizer, sizes), so tests using ADAM with batch 64 compile it once.
ADAM = train.make_optimizer("adam", 0.01)


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits()


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _small_problem(seed=0, n=12, k=4):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, k)).astype(np.float32) * 2
  y = rng.integers(0, k, size=n).astype(np.int32)
  return z, y


# Models and penalty.


def test_linear_model_shapes_and_formula():
  params = train.init_linear(jax.random.key(0), 5, 3)
  assert params["w"].shape == (5, 3) and params["b"].shape == (3,)
  np.testing.assert_array_equal(params["b"], 0.0)
  params = {"w": params["w"], "b": jnp.array([1.0, -2.0, 0.5], params["w"].dtype)}
  x = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
  want = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.array([1.0, -2.0, 0.5])
  np.testing.assert_allclose(train.linear_logits(params, x), want, rtol=1e-5, atol=1e-6)


def test_logistic_model_shapes_and_formula():
  params = train.init_logistic(jax.random.key(0), 5)
  assert params["w"].shape == (5,) and params["b"].shape == ()
  x = np.ones((3, 5), np.float32)
  params = {"w": jnp.arange(5.0), "b": jnp.asarray(-1.0)}
  np.testing.assert_allclose(train.logistic_logits(params, x), [9.0, 9.0, 9.0])


def test_l2_penalty_is_half_sum_of_squares_without_biases():
  params = {"w": jnp.array([[1.0, 2.0], [3.0, -4.0]]), "b": jnp.array([100.0, 100.0])}
  assert float(train.l2_penalty(params)) == pytest.approx(0.5 * (1 + 4 + 9 + 16))
  nested = {"layer": {"w": jnp.array([3.0]), "b": jnp.array([7.0])}, "v": jnp.array([1.0, 1.0])}
  assert float(train.l2_penalty(nested)) == pytest.approx(0.5 * (9 + 2))
  assert float(train.l2_penalty(params, exclude=())) == pytest.approx(0.5 * (30 + 2e4))


# Losses by name, against formulas written here in NumPy.


def test_make_loss_ce_and_smooth():
  z, y = _small_problem()
  logp = _np_log_softmax(z.astype(np.float64))
  onehot = np.eye(4)[y]
  np.testing.assert_allclose(train.make_loss("ce")(z, y), -(onehot * logp).sum(-1), rtol=1e-5)
  smooth = 0.9 * onehot + 0.1 / 4
  np.testing.assert_allclose(
    train.make_loss("smooth", label_smoothing=0.1)(z, y), -(smooth * logp).sum(-1), rtol=1e-5
  )


def test_make_loss_focal_hinge_mse():
  z, y = _small_problem(1)
  z64 = z.astype(np.float64)
  p_y = np.exp(_np_log_softmax(z64))[np.arange(len(y)), y]
  np.testing.assert_allclose(
    train.make_loss("focal", gamma=2.0)(z, y), -((1 - p_y) ** 2) * np.log(p_y), rtol=1e-4
  )
  onehot = np.eye(4)[y]
  hinge = np.max(z64 + 1 - onehot, axis=-1) - z64[np.arange(len(y)), y]
  np.testing.assert_allclose(train.make_loss("hinge")(z, y), hinge, rtol=1e-5, atol=1e-6)
  probs = np.exp(_np_log_softmax(z64))
  np.testing.assert_allclose(
    train.make_loss("mse")(z, y), ((probs - onehot) ** 2).sum(-1), rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(
    train.make_loss("mse_logits")(z, y), ((z64 - onehot) ** 2).sum(-1), rtol=1e-5
  )


def test_make_loss_bce():
  z = np.array([-3.0, 0.0, 2.0, 5.0], np.float32)
  y = np.array([0, 1, 1, 0], np.int32)
  p = 1 / (1 + np.exp(-z.astype(np.float64)))
  want = -(y * np.log(p) + (1 - y) * np.log(1 - p))
  np.testing.assert_allclose(train.make_loss("bce")(jnp.asarray(z), y), want, rtol=1e-5)


def test_focal_with_gamma_zero_is_ce_and_confident_examples_are_finite():
  z, y = _small_problem(2)
  np.testing.assert_allclose(
    train.make_loss("focal", gamma=0.0)(z, y), train.make_loss("ce")(z, y), rtol=1e-5
  )
  confident = jnp.array([[40.0, 0.0, 0.0]])
  focal = train.make_loss("focal")
  g = jax.grad(lambda z: focal(z, jnp.array([0]))[0])(confident)
  assert np.all(np.isfinite(g))
  assert float(focal(confident, jnp.array([0]))[0]) >= 0.0


def test_focal_is_the_public_focal_loss_on_one_hot_labels():
  # One focal loss in the library: `train` composes the public one.
  assert getattr(train, "softmax_focal_loss", L.softmax_focal_loss) is L.softmax_focal_loss
  assert "softmax_focal_loss" not in train.__all__
  z = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [3.0, 3.0, -2.0]], np.float32)
  y = np.array([0, 2, 1])
  for gamma in (0.5, 2.0):
    z64 = z.astype(np.float64)
    p = np.exp(z64 - z64.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    py = p[np.arange(3), y]
    want = -((1 - py) ** gamma) * np.log(py)  # Lin et al., float64
    np.testing.assert_allclose(train.make_loss("focal", gamma=gamma)(z, y), want, rtol=2e-6)
  # A label outside [0, K) is NaN, as for "ce".
  out = train.make_loss("focal")(z, np.array([0, 3, -1]))
  assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])


def test_train_declares_its_public_names():
  # `__all__` is the surface: no typing names, no re-exported losses.
  public = {n for n in vars(train) if not n.startswith("_")}
  leaked = {"Any", "Callable", "Mapping", "Sequence", "annotations", "functools", "math", "sys"}
  assert not leaked & set(train.__all__)
  assert set(train.__all__) <= public
  functions = {n for n in public - leaked if callable(getattr(train, n))}
  imported = {"multiclass_hinge_loss", "sigmoid_binary_cross_entropy", "squared_error"}
  imported |= {"softmax_cross_entropy_with_integer_labels", "softmax_focal_loss"}
  own = {
    n
    for n in functions - imported
    if getattr(getattr(train, n), "__module__", "") == train.__name__
  }
  assert own <= set(train.__all__), own - set(train.__all__)
  # The type aliases are documented where Sphinx reads them (`#:` comments).
  source = pathlib.Path(train.__file__).read_text()
  for alias in ("LossFn", "ModelFn", "Params"):
    assert alias in train.__all__
    assert "#: " in source.split(f"\n{alias} = ")[0].rsplit("\n\n", 1)[-1], alias


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="unknown loss"):
    train.make_loss("nope")
  with pytest.raises(ValueError, match="unknown optimizer"):
    train.make_optimizer("nope", 0.1)


def test_logit_gradient_gap_is_tiny():
  z, y = _small_problem(3, n=50, k=10)
  assert train.logit_gradient_gap(z * 5, y) <= 1e-6


# The jitted step.


@pytest.mark.parametrize(
  "optimizer",
  [optax.sgd(0.5), optax.adam(0.05), optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))],
  ids=["sgd", "adam", "chain"],
)
def test_train_step_reduces_the_loss(digits, optimizer):
  x, y = digits[0][:256], digits[1][:256]
  params = train.init_linear(jax.random.key(0), 64, 10)
  step = train.make_train_step(train.make_loss("ce"), optimizer)
  opt_state = optimizer.init(params)
  losses = []
  for _ in range(15):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(10), abs=0.05)  # near-uniform start
  assert losses[-1] < 0.6 * losses[0]
  assert params["w"].shape == (64, 10)


def test_train_step_loss_includes_the_l2_term(digits):
  x, y = digits[0][:32], digits[1][:32]
  params = train.init_linear(jax.random.key(1), 64, 10, scale=0.5)
  loss_fn = train.make_loss("ce")
  opt = optax.sgd(0.0)
  _, _, plain = train.make_train_step(loss_fn, opt)(params, opt.init(params), x, y)
  _, _, penalised = train.make_train_step(loss_fn, opt, l2=0.1)(params, opt.init(params), x, y)
  want_plain = float(jnp.mean(loss_fn(train.linear_logits(params, x), y)))
  assert float(plain) == pytest.approx(want_plain, rel=1e-5)
  assert float(penalised - plain) == pytest.approx(0.1 * float(train.l2_penalty(params)), rel=1e-4)


# The loop.


def test_fit_reduces_loss_and_is_deterministic(digits):
  def run(seed):
    params = train.init_linear(jax.random.key(0), 64, 10)
    return train.fit(params, ADAM, digits, epochs=4, batch_size=64, seed=seed)

  p1, h1 = run(0)
  p2, h2 = run(0)
  _, h3 = run(1)
  assert set(h1) == {"loss", "train_accuracy", "test_accuracy"}
  assert all(len(v) == 4 for v in h1.values())
  assert h1["loss"][-1] < 0.5 * h1["loss"][0]
  assert h1 == h2
  chex.assert_trees_all_equal(p1, p2)  # every leaf, not only "w"
  assert h3["loss"] != h1["loss"]  # the seed drives the shuffling


def test_fit_epoch_loss_weights_every_example_once(digits):
  # With a zero learning rate the parameters never move, so the epoch loss
  # must be the full-data mean whatever the (padded) batch size.
  x, y = digits[0][:103], digits[1][:103]
  params = train.init_linear(jax.random.key(0), 64, 10, scale=0.3)
  want = float(jnp.mean(train.make_loss("ce")(train.linear_logits(params, x), y)))
  for batch in (7, 500):  # a padded last batch; one batch larger than n
    _, h = train.fit(params, optax.sgd(0.0), (x, y), epochs=1, batch_size=batch, seed=0)
    assert h["loss"][0] == pytest.approx(want, rel=1e-5)
    assert set(h) == {"loss", "train_accuracy"}


@pytest.mark.parametrize("loss", ["ce", "smooth", "focal", "hinge", "mse", "mse_logits"])
def test_every_loss_trains_well_above_chance(digits, loss):
  params = train.init_linear(jax.random.key(0), 64, 10)
  params, h = train.fit(params, ADAM, digits, epochs=3, batch_size=64, seed=0, loss=loss)
  assert h["test_accuracy"][-1] > 0.8  # chance is 0.1


def test_logistic_regression_on_two_digits(digits):
  x_train, y_train, x_test, y_test = digits
  keep_train, keep_test = np.isin(y_train, (3, 8)), np.isin(y_test, (3, 8))
  data = (
    x_train[keep_train],
    (y_train[keep_train] == 8).astype(np.int32),
    x_test[keep_test],
    (y_test[keep_test] == 8).astype(np.int32),
  )
  params = train.init_logistic(jax.random.key(0), 64)
  params, h = train.fit(
    params,
    optax.adam(0.05),
    data,
    epochs=20,
    batch_size=32,
    seed=0,
    loss="bce",
    model=train.logistic_logits,
  )
  assert h["loss"][-1] < h["loss"][0]
  result = train.evaluate_classifier(params, data[2], data[3], model=train.logistic_logits)
  assert set(result) == {"accuracy"}
  assert result["accuracy"] > 0.9
  assert result["accuracy"] == pytest.approx(h["test_accuracy"][-1])


def test_callback_and_progress_bar(digits, capsys):
  seen = []
  params = train.init_linear(jax.random.key(0), 64, 10)
  train.fit(
    params,
    ADAM,
    digits,
    epochs=2,
    batch_size=64,
    seed=0,
    progress=True,
    callback=lambda epoch, p, record: seen.append((epoch, sorted(record))),
  )
  assert seen == [(e, ["loss", "test_accuracy", "train_accuracy"]) for e in (1, 2)]
  assert "epoch" in capsys.readouterr().err  # tqdm drew on stderr


# Evaluation.


def test_evaluate_classifier_against_numpy():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(40, 6)).astype(np.float32)
  y = rng.integers(0, 8, size=40).astype(np.int32)
  params = train.init_linear(jax.random.key(3), 6, 8, scale=1.0)
  z = np.asarray(train.linear_logits(params, x))
  rank = (z > z[np.arange(40), y][:, None]).sum(-1)  # classes scoring above the label
  result = train.evaluate_classifier(params, x, y, k=3)
  assert result["accuracy"] == pytest.approx(np.mean(z.argmax(-1) == y))
  assert result["top_k_accuracy"] == pytest.approx(np.mean(rank < 3))
  assert train.evaluate_classifier(params, x, y, k=50)["top_k_accuracy"] == 1.0


def test_epochs_to_accuracy():
  h = {"train_accuracy": [0.5, 0.89, 0.9, 0.95]}
  assert train.epochs_to_accuracy(h, 0.9) == 3
  assert train.epochs_to_accuracy(h, 0.99) is None
