"""Errors of the fused functions that must name the fix.

These two messages live in the fused engine (`xentjax/_vocab/`, formerly `_fused.py`
and `_distill.py`); the tests are written against the public calls a newcomer makes:

- float labels to `linear_softmax_cross_entropy`: today the message suggests "the
  function that takes one-hot or soft labels", which does not exist for the fused
  head. It must say what does: cast class indices to integers, or use
  `linear_distillation_loss` for a soft teacher.
- teacher logits passed to `linear_distillation_loss` where the teacher's head goes:
  today "`teacher_w` must be a floating-point array (logits or probabilities)", but
  `teacher_w` is a weight matrix. It must say that teacher logits were passed where
  the teacher's head goes, and what takes saved teacher outputs instead.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

N, D, D_T, V = 4, 8, 6, 16


def _student():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
  return x, w


def test_float_labels_to_the_fused_loss_name_the_fix():
  x, w = _student()
  labels = jnp.asarray([1.0, 0.0, 3.0, 2.0], jnp.float32)  # class indices that arrived as floats
  with pytest.raises(TypeError) as e:
    xentjax.linear_softmax_cross_entropy(x, w, labels)
  msg = str(e.value)
  assert "`labels`" in msg and "float32" in msg, msg
  assert "cast" in msg and "integer" in msg, msg  # the fix for class indices stored as floats
  assert "linear_distillation_loss" in msg, msg  # the fix for a soft teacher
  assert "the function that takes one-hot or soft labels" not in msg, msg  # none for this head


def test_teacher_logits_with_labels_in_the_heads_place_say_so():
  # linear_distillation_loss(x, w, teacher_logits, labels): the teacher's logits land in
  # `teacher_x` and the labels in `teacher_w`, where the teacher's head goes.
  x, w = _student()
  teacher_logits = jnp.asarray(np.random.default_rng(1).standard_normal((N, V)), jnp.float32)
  labels = jnp.asarray([1, 0, 3, 2])
  with pytest.raises((TypeError, ValueError)) as e:
    xentjax.linear_distillation_loss(x, w, teacher_logits, labels)
  _assert_names_teacher_logits(str(e.value))


def test_teacher_logits_as_teacher_w_say_so():
  # linear_distillation_loss(x, w, teacher_x, teacher_logits): logits [N, V] where the
  # head [D_t, V] goes (teacher_x has D_t = 6 features, the logits N = 4 rows).
  x, w = _student()
  rng = np.random.default_rng(2)
  teacher_x = jnp.asarray(rng.standard_normal((N, D_T)), jnp.float32)
  teacher_logits = jnp.asarray(rng.standard_normal((N, V)), jnp.float32)
  with pytest.raises((TypeError, ValueError)) as e:
    xentjax.linear_distillation_loss(x, w, teacher_x, teacher_logits, jnp.asarray([1, 0, 3, 2]))
  _assert_names_teacher_logits(str(e.value))


def _assert_names_teacher_logits(msg: str) -> None:
  assert "teacher logits" in msg.lower(), msg  # what was passed
  assert "`teacher_w`" in msg and "head" in msg, msg  # where it went, and what goes there
  assert "linear_topk_distillation_loss" in msg, msg  # what takes saved teacher outputs
  assert "(logits or probabilities)" not in msg, msg  # the misleading description of teacher_w
