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


def _convert_hf_tool():
  spec = importlib.util.spec_from_file_location(
      "convert_hf", pathlib.Path(__file__).parent.parent / "tools" / "convert_hf.py")
  convert_hf = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(convert_hf)
  return convert_hf


def test_convert_hf_tool_round_trips_a_checkpoint_through_a_run_directory(tmp_path):
  convert_hf = _convert_hf_tool()
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


TOKENIZER_TEXT = ["def greet(name):\n    return f'héllo {name} ✓'\n",
                  "the quick brown fox jumps over the lazy dog\n",
                  "for i in range(10):\n    print(i * i)  # squares\n"] * 40


def save_hf_gpt2_with_tokenizer(directory: pathlib.Path, n_positions: int = 64):
  """A tiny GPT-2 as transformers saves it, with a byte-level BPE trained here (GPT-2's kind of
  tokenizer, nothing downloaded); returns (model, transformers tokenizer)."""
  import tokenizers  # noqa: PLC0415 - a core dependency
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(TOKENIZER_TEXT, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
  config = transformers.GPT2Config(
      vocab_size=len(tokenizer), n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id)
  model = random_hf_model(config)
  model.save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return model, tokenizer


def test_hf_tokenizer_reads_what_transformers_writes(tmp_path):
  from bigflax.data.tokenizers import HFTokenizer
  _, reference = save_hf_gpt2_with_tokenizer(tmp_path)
  ours = HFTokenizer(str(tmp_path))
  text = "def f(x):\n    return 'héllo ✓ 🙂'  # unseen: 🙂\n"
  ids = ours.encode(text)
  assert list(ids) == reference.encode(text, add_special_tokens=False)
  assert list(ours.encode_document(text.encode(), "t")) == reference.encode(text)  # GPT-2: none
  assert ours.decode(ids) == text and ours.vocab_size == len(reference)
  assert (ours.bos_token, ours.bos_id) == ("<|endoftext|>", reference.bos_token_id)
  lengths = ours.byte_lengths()
  assert lengths.dtype == np.int64 and lengths.shape == (ours.vocab_size,)
  assert lengths[ids].sum() == len(text.encode()) and lengths[ours.eos_id] == 0
  assert lengths.max() > 2  # merged tokens stand for several bytes


def test_a_converted_gpt2_continues_a_prompt_with_transformers_text(tmp_path):
  from bigflax import decode, rundir
  model, tokenizer = save_hf_gpt2_with_tokenizer(tmp_path / "hf")
  convert_hf = _convert_hf_tool()
  convert_hf.main(["to_bigflax", str(tmp_path / "hf"), str(tmp_path / "run")])
  assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == [
      "tokenizer.json", "tokenizer_config.json"]
  config, ours, params, hf_tokenizer = rundir.load_run(tmp_path / "run")
  assert config.data.tokenizer == "hf"
  prompt = "def greet(name):\n    return"
  text = decode.sample_text(ours, params, hf_tokenizer, prompt, max_new_tokens=16,
                            temperature=0.0, top_k=0, top_p=1.0, seed=0)
  inputs = tokenizer(prompt, return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, min_new_tokens=16)
  expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
  assert len(expected) > 8 and text == expected
  convert_hf.main(["to_hf", str(tmp_path / "run"), str(tmp_path / "back")])  # the tokenizer too
  back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
  assert back.encode(prompt + text) == tokenizer.encode(prompt + text)
