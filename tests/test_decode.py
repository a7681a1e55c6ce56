import jax
import jax.numpy as jnp
import numpy as np

from bigflax.decode import filter_logits

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def kept(**kw):
  args = dict(temperature=1.0, top_k=0, top_p=1.0, vocab_size=4) | kw
  return np.asarray(filter_logits(LOGITS, **args) > -1e30)[0].tolist()


def test_filters():
  assert kept() == [True, True, True, True]
  assert kept(top_k=2) == [True, True, False, False]
  assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 ≤ 0.8
  assert kept(top_p=0.5) == [True, False, False, False]
  assert kept(temperature=0.0) == [True, False, False, False]  # greedy
  assert kept(vocab_size=3) == [True, True, True, False]  # padded ids never sampled


def test_temperature_sharpens_the_distribution():
  hot = jax.nn.softmax(filter_logits(LOGITS, temperature=2.0, top_k=0, top_p=1.0, vocab_size=4))
  cold = jax.nn.softmax(filter_logits(LOGITS, temperature=0.5, top_k=0, top_p=1.0,
                                      vocab_size=4))
  assert cold[0, 0] > 0.5 > hot[0, 0]
