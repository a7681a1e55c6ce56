"""Hugging Face parity: small random transformers models, converted both ways, same logits."""

import dataclasses
import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # test-only dependency: pip install -e .[test]
transformers = pytest.importorskip("transformers")

from bigflax import interop  # noqa: E402
from bigflax.model import ModelConfig, Transformer  # noqa: E402

VOCAB, LENGTH = 96, 24


def random_hf_model(config):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  with torch.no_grad():  # HF inits biases to 0 and norms to 1: perturb everything so each counts
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def gpt2(**kw):
  return transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                 n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def llama(**kw):
  return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=32, **kw)


HF_MODELS = {
    "gpt2": gpt2(),
    "gpt2_exact_gelu_untied": gpt2(activation_function="gelu", tie_word_embeddings=False),
    "llama_mha_tied": llama(num_key_value_heads=4, tie_word_embeddings=True),
    "llama_gqa_theta5e5": llama(num_key_value_heads=2, rope_theta=500000.0),
    "llama_mqa_biases": llama(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
}


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def bigflax_logits(fields, params, tokens, **overrides):
  cfg = ModelConfig(**{**fields, **overrides})
  return np.asarray(Transformer(cfg).apply({"params": interop.to_layout(params, cfg)}, tokens))


@pytest.mark.parametrize("name", HF_MODELS)
def test_imported_checkpoint_gives_transformers_logits(name, tmp_path):
  model = random_hf_model(HF_MODELS[name])
  model.save_pretrained(tmp_path)
  fields, params = interop.load_hf(tmp_path)
  tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, VOCAB)
  expected = hf_logits(model, tokens)
  assert np.abs(expected).max() > 0.1  # not a degenerate comparison
  assert np.abs(bigflax_logits(fields, params, tokens) - expected).max() <= 1e-4
  scanned = bigflax_logits(fields, params, tokens, scan_layers=True)
  assert np.abs(scanned - expected).max() <= 1e-4


def init_params(cfg):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(2), jnp.zeros((1, 8), jnp.int32)))["params"]
  # Norm scales start at 1 and biases at 0; randomize them so a swapped tensor would show.
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape),
                      params)


BIGFLAX_MODELS = {
    "gpt2": ModelConfig(vocab_size=VOCAB, block_size=32, num_layers=2, num_heads=4,
                        embed_dim=32, mlp_dim=64),
    "llama_gqa_scanned": ModelConfig(vocab_size=VOCAB, block_size=32, num_layers=2, num_heads=4,
                                     embed_dim=32, mlp_dim=48, num_kv_heads=2, norm="rmsnorm",
                                     positions="rope", rope_theta=1e5, mlp="swiglu",
                                     use_bias=False, tie_embeddings=False, scan_layers=True),
}


@pytest.mark.parametrize("name", BIGFLAX_MODELS)
def test_export_loads_in_transformers_and_round_trips_exactly(name, tmp_path):
  cfg = BIGFLAX_MODELS[name]
  params = init_params(cfg)
  family = interop.save_hf(tmp_path, cfg, params)
  assert family == name.split("_")[0]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, VOCAB)
  ours = np.asarray(Transformer(cfg).apply({"params": params}, tokens))
  assert np.abs(hf_logits(hf_model, tokens) - ours).max() <= 1e-4

  fields, imported = interop.load_hf(tmp_path)
  back = ModelConfig(**{**fields, "scan_layers": cfg.scan_layers})
  assert back == cfg
  imported = interop.to_layout(imported, back)
  assert jax.tree.structure(imported) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, imported, params)


def test_export_refuses_a_model_transformers_cannot_hold(tmp_path):
  cfg = dataclasses.replace(BIGFLAX_MODELS["gpt2"], norm="rmsnorm")
  with pytest.raises(interop.InteropError, match="gpt2 needs model.norm='layernorm'.*llama needs"):
    interop.save_hf(tmp_path, cfg, init_params(cfg))


def test_import_refuses_an_unknown_architecture(tmp_path):
  (tmp_path / "config.json").write_text('{"model_type": "bert"}')
  with pytest.raises(interop.InteropError, match="'bert'.*supported: \\['gpt2', 'llama'\\]"):
    interop.load_hf(tmp_path)


def test_convert_hf_tool_round_trips_a_checkpoint_through_a_run_directory(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "convert_hf", pathlib.Path(__file__).parent.parent / "tools" / "convert_hf.py")
  convert_hf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_hf)
  original = random_hf_model(HF_MODELS["llama_gqa_theta5e5"])
  original.save_pretrained(tmp_path / "hf")
  convert_hf.main(["to_bigflax", str(tmp_path / "hf"), str(tmp_path / "run"), "--scan_layers"])
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["scan_layers"]
  convert_hf.main(["to_hf", str(tmp_path / "run"), str(tmp_path / "back")])
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
  expected = original.state_dict()
  assert back.state_dict().keys() == expected.keys()
  for name, tensor in back.state_dict().items():
    assert torch.equal(tensor, expected[name]), name
