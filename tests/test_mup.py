"""μP (config.model.parametrization=mup): exactly the standard model at the base width; elsewhere
hidden init and Adam learning rates × base/width (std × its root), the head's input × base/width
and attention × 1/head_dim; and tools/coord_check.py's activations stay flat with the width."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigflax import interop, optim
from bigflax.config import ModelConfig, base
from bigflax.errors import ConfigError, InteropError
from bigflax.model import Transformer

from conftest import REPO

spec = importlib.util.spec_from_file_location("coord_check", REPO / "tools" / "coord_check.py")
coord_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(coord_check)

TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)


def model_config(**kw) -> ModelConfig:
  fields = dict(vocab_size=64, block_size=16, num_layers=2, num_heads=2, embed_dim=32)
  return ModelConfig(**{**fields, **kw})


def init(cfg: ModelConfig):
  return jax.jit(Transformer(cfg).init)(jax.random.key(0), TOKENS)["params"]


def logits(cfg: ModelConfig, params, **kw):
  return jax.jit(lambda p: Transformer(cfg).apply({"params": p}, TOKENS, **kw))(params)


def adam(name="adam", **kw):
  c = base().optimizer
  c.update(name=name, learning_rate=0.1, warmup_steps=0, schedule="constant", clip_norm=0.0,
           weight_decay=0.0)
  c.update(**kw)
  return c


def first_update(cfg: ModelConfig, c, params):
  """The optimizer's first update for random gradients (the boxed params initialise it, as the
  train state does; the update sees them unboxed)."""
  tx = optim.make_optimizer(c, steps=10, model=cfg)
  state = nn.unbox(jax.jit(tx.init)(params))
  params = nn.unbox(params)
  rng = np.random.default_rng(2)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  return params, grads, updates


def test_mup_at_the_base_width_is_exactly_the_standard_model():
  standard, mup = model_config(), model_config(parametrization="mup", mup_base_width=32)
  assert mup.attention_scale == standard.attention_scale == 16 ** -0.5  # head_dim 16
  p_standard, p_mup = init(standard), init(mup)
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(p_standard), nn.unbox(p_mup))
  np.testing.assert_array_equal(logits(standard, p_standard), logits(mup, p_mup))
  c = adam("adamw", weight_decay=0.1)
  _, _, u_standard = first_update(standard, c, p_standard)
  _, _, u_mup = first_update(mup, c, p_mup)
  jax.tree.map(np.testing.assert_array_equal, u_standard, u_mup)


def test_attention_scale_is_one_over_head_dim_under_mup():
  # 4 heads: base width 64 → head_dim 16; width 256 → head_dim 64: sqrt(16)/64 = 1/16.
  cfg = lambda **kw: ModelConfig(num_heads=4, embed_dim=256, mup_base_width=64, **kw)
  assert cfg().attention_scale == pytest.approx(1 / 8)  # standard: 1/sqrt(64)
  assert cfg(parametrization="mup").attention_scale == pytest.approx(1 / 16)
  assert cfg(parametrization="mup").width_ratio == 0.25 and cfg().width_ratio == 1.0
  # Doubling the width halves the scale (1/d), where standard's falls by √2 only.
  wide = ModelConfig(num_heads=4, embed_dim=512, mup_base_width=64, parametrization="mup")
  assert wide.attention_scale == pytest.approx(1 / 32)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mup_init_scales_hidden_matrices_and_the_readout(scan_layers):
  # Width 128 at base 32: hidden std 0.02·sqrt(1/4) = 0.01 (residual outputs / sqrt(2·layers));
  # embeddings and norms as in GPT-2; logits = norm_final(x)·Eᵀ · 1/4.
  cfg = model_config(embed_dim=128, parametrization="mup", mup_base_width=32,
                     scan_layers=scan_layers)
  params = nn.unbox(init(cfg))
  block = params["blocks"] if scan_layers else params["block_0"]
  for kernel, std in ((block["mlp"]["up"]["kernel"], 0.01),
                      (block["attn"]["query"]["kernel"], 0.01),
                      (block["mlp"]["down"]["kernel"], 0.01 / 2),
                      (params["token_embed"]["embedding"], 0.02)):
    assert np.std(kernel) == pytest.approx(std, rel=0.05)
  out, state = logits(cfg, params, mutable=["intermediates"],
                      capture_intermediates=lambda m, _: m.name == "norm_final")
  x = state["intermediates"]["norm_final"]["__call__"][0]
  np.testing.assert_allclose(out, x @ params["token_embed"]["embedding"].T / 4, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mup_learning_rates_are_base_over_width_on_hidden_matrices_only(scan_layers):
  # Adam's first step is lr·g/(|g| + eps) on every leaf; μP multiplies the hidden matrices' by
  # base/width = 1/4 and leaves embeddings, norms, biases and the untied output layer alone.
  cfg = model_config(embed_dim=128, parametrization="mup", mup_base_width=32,
                     tie_embeddings=False, scan_layers=scan_layers)
  c = adam()
  params, grads, updates = first_update(cfg, c, init(cfg))
  hidden = []
  for (path, g), u in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(updates)):
    names = [k.key for k in path]
    is_hidden = names[-1] == "kernel" and names[-2] != "lm_head"
    multiplier = 0.25 if is_hidden else 1.0
    np.testing.assert_allclose(u, -c.learning_rate * multiplier * g / (np.abs(g) + c.eps),
                               rtol=1e-5, err_msg=str(names))
    hidden += [names[-2]] if is_hidden else []
  assert sorted(set(hidden)) == ["down", "key", "out", "query", "up", "value"]
  assert "lm_head" in params


def test_mup_weight_decay_follows_the_scaled_rate():
  # AdamW with zero gradients: the step is -lr·wd·w, × base/width on a hidden matrix.
  cfg = model_config(embed_dim=64, parametrization="mup", mup_base_width=32)
  c = adam("adamw", weight_decay=0.5)
  tx = optim.make_optimizer(c, steps=10, model=cfg)
  params = nn.unbox(init(cfg))
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, jax.jit(tx.init)(params), params)
  w = params["block_0"]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(updates["block_0"]["mlp"]["up"]["kernel"], -0.1 * 0.5 * w * 0.5,
                             rtol=1e-6)


def test_bad_mup_config_is_one_line():
  for kw, message in (({"parametrization": "mu-p"}, "parametrization='mu-p' is unknown"),
                      ({"mup_base_width": 0}, "mup_base_width must be a positive width")):
    with pytest.raises(ConfigError, match=message) as e:
      model_config(**kw)
    assert "\n" not in str(e.value)
  cfg = model_config(parametrization="mup")
  for name in ("sgd", "muon"):
    with pytest.raises(ConfigError, match=f"μP for Adam, not config.optimizer.name='{name}'"):
      optim.make_optimizer(adam(name), steps=10, model=cfg)
  optim.make_optimizer(adam("sgd"), steps=10, model=model_config())  # standard: any optimizer


def test_a_mup_model_away_from_its_base_width_does_not_export_to_transformers():
  assert interop.family_of(model_config(parametrization="mup", mup_base_width=32)) == "gpt2"
  with pytest.raises(InteropError, match="uses μP away from its base width"):
    interop.family_of(model_config(parametrization="mup", mup_base_width=64))


@pytest.mark.slow
def test_coord_check_activations_stay_flat_under_mup_and_grow_under_standard(corpus_file):
  # tools/coord_check.py's measurement over 6 steps at lr 1e-2, width 256 over width 32 (base
  # 32). Measured: the last block's output at step 6 grows 28× under standard, 0.53× under μP;
  # the logits' largest ratio over the steps is 5.3 under standard, 0.99 under μP (at init μP's
  # logits shrink as sqrt(base/width): 0.39).
  setup = coord_check.Setup(data=str(corpus_file), base_width=32, batch_size=8)
  results = coord_check.coord_check(setup, [32, 256], steps=6, lr=1e-2)
  ratio = {p: {name: values[:, 1] / values[:, 0] for name, values in table.items()}
           for p, table in results.items()}
  assert 1 / 3 < ratio["mup"]["block_1"][-1] < 3
  assert ratio["standard"]["block_1"][-1] > 10
  assert max(ratio["mup"]["logits"]) < 1.5
  assert max(ratio["standard"]["logits"]) > 3.5
