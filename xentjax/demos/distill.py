"""`xentjax demo --distill`: distill a teacher into a smaller student on the shipped digits.

The experiment (shared with `notebooks/09_distillation.ipynb`): a teacher
MLP (64 -> 128 ReLU features -> 10) is trained on every labelled training
digit with `xentjax.linear_softmax_cross_entropy`. A student a tenth of its
width (64 -> 12 tanh features -> 10) then sees the labels of only
`label_fraction` of the training digits, the setting where a teacher helps
most: trained on those labels alone it overfits them; distilled with
`xentjax.linear_distillation_loss` it learns from the teacher's whole output
distribution on every training input (a transfer set without labels). Each
model's last layer is the fused head: its hidden features (with a constant 1
appended, the bias) are ``x`` and the output weights ``w``, so neither the
student's nor the teacher's logits are formed inside the loss.

Reproducibility: the data split, the initial parameters (float32, also under
``JAX_ENABLE_X64``) and the iteration order are fixed by ``seed``, so two runs
on one machine print the same table. Across set-ups the figures can differ by
a few test digits (one digit is 1/450 = 0.0022): XLA's CPU programs round
differently with the number of threads and with ``JAX_ENABLE_X64`` (measured:
1 core, 2 cores, 2 cores under x64), and 300 Adam steps amplify a last-bit
difference into a different decision on a few digits. The teacher and the
label-only student agree to a digit; a distilled cell moves by up to 7 digits
(0.016). The README gives the table with that spread.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = [
  "BETAS",
  "BETA_NAMES",
  "STEPS",
  "STUDENT_WIDTH",
  "TEACHER_WIDTH",
  "TEMPERATURES",
  "compare",
  "run",
  "table",
]

TEACHER_WIDTH = 128
STUDENT_WIDTH = 12
TEMPERATURES = (1.0, 2.0, 4.0)
BETAS = (0.0, 0.5, 1.0)
STEPS = 300  # full-batch Adam steps per model
BETA_NAMES = {0.0: "forward KL", 0.5: "JSD(0.5)", 1.0: "reverse KL"}


def _features(params, x, activation):
  """Hidden features with a constant 1 appended: `[n, width + 1]` (the head's bias row)."""
  import jax.numpy as jnp

  h = activation(x @ params["w1"] + params["b1"][None, :])
  return jnp.concatenate([h, jnp.ones((h.shape[0], 1), h.dtype)], axis=1)


def _init(key, n_in, width, n_out):
  """float32 parameters whatever ``JAX_ENABLE_X64`` says (the figures must not depend on it)."""
  import jax
  import jax.numpy as jnp

  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (n_in, width), jnp.float32) / n_in**0.5,
    "b1": jnp.zeros((width,), jnp.float32),
    "head": 0.01 * jax.random.normal(k2, (width + 1, n_out), jnp.float32),
  }


def _fit(loss, params, steps, lr):
  """Full-batch Adam for `steps` steps as one jitted `lax.scan`; returns the params."""
  import jax
  import optax

  opt = optax.adam(lr)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(loss)(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return params

  return run(params)


def _accuracy(params, activation, x, y):
  import jax.numpy as jnp

  logits = _features(params, x, activation) @ params["head"]
  return float(jnp.mean(jnp.argmax(logits, axis=1) == y))


def compare(
  *,
  temperatures=TEMPERATURES,
  betas=BETAS,
  label_fraction: float = 0.1,
  steps: int = 300,
  seed: int = 0,
) -> dict[str, Any]:
  """Train the teacher, the label-only student and one distilled student per (T, beta).

  Returns a dict with ``teacher`` (its test accuracy), ``labels_only`` (the
  student trained on the labelled fraction), ``distilled`` (``{(T, beta):
  test accuracy}``), ``n_labelled``, ``n_train``, ``n_test`` and ``seconds``.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  import xentjax
  from xentjax import datasets

  start = time.perf_counter()
  x_train, x_test = (jnp.asarray(a, jnp.float32) for a in datasets.load_digits()[::2])
  y_train, y_test = (jnp.asarray(a, jnp.int32) for a in datasets.load_digits()[1::2])
  n_train = x_train.shape[0]
  rng = np.random.default_rng(seed)
  labelled = np.sort(rng.permutation(n_train)[: max(10, round(label_fraction * n_train))])
  k_teacher, k_student = jax.random.split(jax.random.key(seed))
  relu, tanh = jax.nn.relu, jnp.tanh

  def teacher_loss(p):
    h = _features(p, x_train, relu)
    return xentjax.linear_softmax_cross_entropy(h, p["head"], y_train) + 1e-4 * jnp.sum(
      p["w1"] ** 2
    )

  teacher = _fit(teacher_loss, _init(k_teacher, 64, TEACHER_WIDTH, 10), steps, 1e-2)
  h_teacher = jax.lax.stop_gradient(_features(teacher, x_train, relu))
  student0 = _init(k_student, 64, STUDENT_WIDTH, 10)

  x_lab, y_lab = x_train[labelled], y_train[labelled]

  def labels_loss(p):
    return xentjax.linear_softmax_cross_entropy(_features(p, x_lab, tanh), p["head"], y_lab)

  results = {
    "teacher": _accuracy(teacher, relu, x_test, y_test),
    "labels_only": _accuracy(_fit(labels_loss, student0, steps, 1e-2), tanh, x_test, y_test),
    "distilled": {},
    "n_labelled": len(labelled),
    "n_train": n_train,
    "n_test": int(x_test.shape[0]),
  }
  for t in temperatures:
    for beta in betas:

      def distill_loss(p, t=t, beta=beta):
        h = _features(p, x_train, tanh)
        return xentjax.linear_distillation_loss(
          h, p["head"], h_teacher, teacher["head"], beta=beta, temperature=t
        )

      student = _fit(distill_loss, student0, steps, 1e-2)
      results["distilled"][(t, beta)] = _accuracy(student, tanh, x_test, y_test)
  results["seconds"] = time.perf_counter() - start
  return results


def table(results: dict[str, Any]) -> str:
  """The comparison as a plain-text table (rows: temperatures, columns: divergences)."""
  betas = sorted({b for _, b in results["distilled"]})
  temps = sorted({t for t, _ in results["distilled"]})
  head = ["student test accuracy", *(f"{BETA_NAMES.get(b, f'beta={b:g}')}" for b in betas)]
  rows = [
    [f"distilled, T={t:g}", *(f"{results['distilled'][(t, b)]:.4f}" for b in betas)] for t in temps
  ]
  widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
  line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  out = [line(head), "-+-".join("-" * w for w in widths), *(line(r) for r in rows)]
  return "\n".join(out)


def run(args) -> int:
  """Entry point of `xentjax demo --distill` (parsing is done by `xentjax.cli._demo`)."""
  from xentjax.cli._common import own_demo_seed

  seed = own_demo_seed(args, "--distill", "runs its own comparison")
  print(
    f"distilling a teacher MLP (64-{TEACHER_WIDTH}-10) into a student (64-{STUDENT_WIDTH}-10) "
    "on the 8x8 digits with xentjax.linear_distillation_loss",
    flush=True,
  )
  r = compare(temperatures=TEMPERATURES, betas=BETAS, steps=STEPS, seed=seed)
  print(
    f"the student sees the labels of {r['n_labelled']} of the {r['n_train']} training digits; "
    f"distilled students see the teacher's outputs on all {r['n_train']} instead"
  )
  print(f"teacher test accuracy: {r['teacher']:.4f}")
  print(f"student trained on the {r['n_labelled']} labels alone: {r['labels_only']:.4f}")
  print(table(r))
  best = max(r["distilled"], key=r["distilled"].get)
  print(
    f"best distilled student: T={best[0]:g}, {BETA_NAMES.get(best[1], best[1])}, "
    f"{r['distilled'][best]:.4f} test accuracy ({r['n_test']} test digits)"
  )
  print(
    f"one test digit is {1 / r['n_test']:.4f} of accuracy. The run is deterministic (fixed "
    "seeds, float32 parameters); the float rounding of 300 Adam steps still moves a figure "
    "by a few digits with the CPU thread count, JAX_ENABLE_X64 or the JAX version"
  )
  print(f"wall time: {r['seconds']:.1f} s")
  return 0
