"""Supervised fine-tuning data: the loss counts completion tokens only, through packing."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigflax import data, objective, train
from bigflax.config import ModelConfig
from bigflax.data import packing, pipeline, sft, tokenizers
from bigflax.errors import ConfigError, DataError
from bigflax.model import Transformer

from conftest import tiny_config

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
          "{% endif %}")
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "I am fine."},
                {"role": "user", "content": "And 2+2?"},
                {"role": "assistant", "content": "4, of course."}]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def qa(count, start=0):
  """Prompt/completion examples of one token length (12 bytes each)."""
  return [{"prompt": f"q{i:03d}?", "completion": f" a{i:03d}!!"}
          for i in range(start, start + count)]


def sft_config(path, **overrides):
  return tiny_config(path, **{"data.source": "sft", "data.tokenizer": "byte", **overrides})


def test_the_loss_counts_completion_and_assistant_tokens_only(tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", qa(6) + [{"messages": CONVERSATION}] * 4)
  c = sft_config(path, **{"data.val_fraction": 0.2})
  corpus = data.load_corpus(c.data, c.model.block_size)
  byte = corpus.tokenizer
  first = corpus.train.tokens(0)
  assert byte.decode(first[0]) == "q000? a000!!"
  assert byte.decode(first[0][first[1] == 1]) == " a000!!"
  chat = corpus.train.tokens(6)
  assert byte.decode(chat[0][chat[1] == 1]) == "I am fine.<|end|>\n4, of course.<|end|>\n"
  assert byte.decode(chat[0]).startswith("<|system|>\nAnswer briefly.<|end|>\n<|user|>\n")
  # Packed rows of a whole epoch count each completion token as a target exactly once.
  packed = pipeline.PackedRows(corpus.train, byte, seed=0, split=data.TRAIN,
                               block_size=c.model.block_size)
  batch = packed.rows(np.arange(packed.rows_per_epoch))
  counted = batch["targets"][batch["loss_mask"] > 0]
  expected = np.concatenate([corpus.train.tokens(i)[0][1:][corpus.train.tokens(i)[1][1:] > 0]
                             for i in range(len(corpus.train))])
  assert sorted(counted) == sorted(expected)
  assert packed.predictions == len(expected) == batch["loss_mask"].sum()
  _, info = data.eval_batches(corpus, c, 4, 0)
  assert info.predictions == info.split_predictions == corpus.val.counted_targets().sum() > 0


def _tiny_model(vocab_size=256, block_size=36):
  model = Transformer(ModelConfig(vocab_size=vocab_size, block_size=block_size, num_layers=1,
                                  num_heads=2, embed_dim=32))
  params = model.init(jax.random.key(0), jnp.zeros((1, block_size), jnp.int32))["params"]
  return model, params


def _token_losses(model, params, batch):
  """(summed NLL over loss_mask, counted targets) of a batch through the model."""
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
  nll = -objective.token_log_likelihood(logits, batch["targets"])
  return float((np.asarray(nll, np.float64) * batch["loss_mask"]).sum()), batch["loss_mask"].sum()


def test_prompt_tokens_contribute_exactly_zero_gradient(tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", qa(8) + [{"messages": CONVERSATION}] * 2)
  c = sft_config(path, **{"model.block_size": 36})
  corpus = data.load_corpus(c.data, 36)
  batch = data.make_batches(corpus, c, data.TRAIN, 4).batch(0)
  model, params = _tiny_model()
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"], batch["positions"],
                                batch["segment_ids"])
  grad = jax.grad(lambda l: objective.next_token_loss(l, batch["targets"],
                                                      batch["loss_mask"])[0])(logits)
  per_position = np.abs(np.asarray(grad)).sum(-1)
  counted = batch["loss_mask"] > 0
  assert counted.any() and (~counted).any()
  assert (per_position[~counted] == 0).all()  # exactly: a prompt target adds nothing
  assert (per_position[counted] > 0).all()
  # And so the parameters' gradient ignores what the prompt positions would predict.
  @jax.jit
  @jax.grad
  def grads(p, targets):
    out = model.apply({"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return objective.next_token_loss(out, targets, batch["loss_mask"])[0]
  scrambled = np.where(counted, batch["targets"], (batch["targets"] + 7) % 256)
  one, two = grads(params, batch["targets"]), grads(params, scrambled)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), one, two)


def test_packed_and_unpacked_batches_give_the_same_loss(tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", qa(9) + qa(1, 100))
  c = sft_config(path, **{"data.val_fraction": 0.1})
  corpus = data.load_corpus(c.data, 36)
  examples = [corpus.train.tokens(i) for i in range(len(corpus.train))]
  assert {e.shape[1] for e in examples} == {12}
  # Unpacked: one example a row, padded. Packed: rows of 36 + 1 tokens hold three whole examples.
  length = 37
  rows = np.zeros((4, len(examples), length), np.int32)
  for i, example in enumerate(examples):
    rows[0, i, :12], rows[1, i, :12], rows[2, i, :12] = example[0], 1, np.arange(12)
    rows[3, i, :12] = example[1]
  unpacked = packing.batch_fields(*rows)
  packed_rows = pipeline.PackedRows(corpus.train, corpus.tokenizer, seed=3, split=data.TRAIN,
                                    block_size=36)
  packed = packed_rows.rows(np.arange(packed_rows.rows_per_epoch))
  assert packed_rows.rows_per_epoch == 3 and (packed["segment_ids"].max(1) >= 3).all()
  model, params = _tiny_model()
  total_unpacked, count_unpacked = _token_losses(model, params, unpacked)
  total_packed, count_packed = _token_losses(model, params, packed)
  assert count_unpacked == count_packed == 9 * 7  # each completion token is a target
  np.testing.assert_allclose(total_packed / count_packed, total_unpacked / count_unpacked,
                             rtol=1e-6)


@pytest.fixture(scope="module")
def hf_chat_tokenizer(tmp_path_factory):
  """A tiny byte-level BPE with ChatML specials and a chat template, saved as transformers does."""
  import tokenizers as tokenizers_lib  # noqa: PLC0415 - a core dependency
  import transformers  # noqa: PLC0415 - the test extra has it; never skipped
  from tokenizers import decoders, models, pre_tokenizers, trainers
  bpe = tokenizers_lib.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(
      [m["content"] for m in CONVERSATION] * 20 + ["What is the capital of France? Paris."] * 20,
      trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<|im_start|>",
                                                          "<|im_end|>"],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  reference = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>",
                                                   eos_token="</s>", chat_template=CHATML)
  directory = tmp_path_factory.mktemp("hf-chat")
  reference.save_pretrained(directory)
  return reference, tokenizers.HFTokenizer(str(directory))


def test_tokens_equal_transformers_apply_chat_template(hf_chat_tokenizer):
  reference, ours = hf_chat_tokenizer
  pair = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."}]
  cases = [(sft.Example("a line", prompt=pair[0]["content"], completion=pair[1]["content"]),
            pair, ["Paris.<|im_end|>\n"]),
           (sft.Example("a line", messages=tuple(CONVERSATION)), CONVERSATION,
            ["I am fine.<|im_end|>\n", "4, of course.<|im_end|>\n"])]
  for example, messages, answers in cases:
    tokens, weights = sft.encode(example, ours)
    expected = reference.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert tokens.tolist() == expected
    assert tokens[0] == reference.bos_token_id  # the template's {{ bos_token }}
    # The counted tokens are the assistant turns, each through its <|im_end|> and newline.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], weights, [0]])))
    spans = [reference.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    assert spans == answers


def test_without_a_chat_template_a_prompt_and_completion_are_one_document(tmp_path):
  class Marked(tokenizers.ByteTokenizer):  # a tokenizer that marks documents: BOS 256, EOS 257
    vocab_size = 258

    def encode_document(self, raw, source):
      return np.concatenate([[256], super().encode_document(raw, source), [257]])
  tokens, weights = sft.encode(sft.Example("x", prompt="Q:", completion=" yes"), Marked())
  assert tokens.tolist() == [256, *b"Q: yes", 257]
  assert weights.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # the completion and the EOS

  class NamesEOS(tokenizers.ByteTokenizer):  # GPT-2's way: an EOS, not put on documents
    vocab_size, eos_id = 257, 256
  tokens, weights = sft.encode(sft.Example("x", prompt="Q:", completion=" yes"), NamesEOS())
  assert tokens.tolist() == [*b"Q: yes", 256] and weights.tolist() == [0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2 is not JSON"),
    (json.dumps({"prompt": "only a prompt"}), "line 2 has no field 'completion'"),
    (json.dumps({"text": "hi"}), "line 2 has neither 'messages' nor 'prompt' and 'completion'"),
    (json.dumps({"prompt": "p", "completion": 3}), "line 2: the field 'completion' is a int"),
    (json.dumps({"messages": [{"role": "user"}]}), "line 2: message 0 is not an object"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     "line 2: no message has role 'assistant'"),
    ("[1, 2]", "line 2 is a JSON list, not an object"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(qa(1)[0]) + "\n" + line + "\n" + json.dumps(qa(1)[0]) + "\n")
  with pytest.raises(DataError) as error:
    data.load_corpus(sft_config(path).data, 16)
  assert str(path) in str(error.value) and message in str(error.value)
  assert "\n" not in str(error.value)


def test_sft_examples_need_packed_rows(tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", qa(10))
  with pytest.raises(ConfigError, match="config.data.batching=packed"):
    data.check_config(sft_config(path, **{"data.batching": "windows"}).data)


def test_a_trainer_fine_tunes_on_sft_examples(tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", qa(40) + [{"messages": CONVERSATION}] * 8)
  trainer = train.Trainer(sft_config(path, **{"model.block_size": 32, "data.tokenizer": "char"}),
                          devices=jax.devices()[:1])
  assert trainer.config.data.charset  # built from the examples' text, template markers included
  losses = [float(trainer.step(i)["loss"]) for i in range(4)]
  assert np.isfinite(losses).all()
  assert np.isfinite(trainer.evaluate()["eval_loss"])


def test_an_eval_set_of_sft_examples_counts_their_completions(tmp_path):
  # Examples not tokenized by load_corpus (an eval set opens only the source) tokenize in the
  # pipeline.
  path = write_jsonl(tmp_path / "sft.jsonl", qa(10))
  c = sft_config(path, **{"data.val_path": str(path)})
  train_split, val_split, _ = data.open_splits(c.data)
  corpus = data.Corpus(val_split, val_split, tokenizers.ByteTokenizer(), "sft")
  _, info = data.eval_batches(corpus, c, 4, 0)
  assert info.predictions == 10 * 7 and info.documents == 10


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{% if m['content'] == 'ok' %}{{ raise_exception('not ok') }}"
     "{% endif %}{% endfor %}", "the chat template fails on this conversation (not ok)"),
    ("{% for m in messages %}{{ m['content'] }}|{% endfor %}{% if add_generation_prompt %}>>"
     "{% endif %}", "the chat template does not render this conversation turn by turn"),
    ("{% for m in messages %}", "the chat template fails on this conversation"),
])
def test_a_chat_template_that_cannot_mark_the_answers_names_the_example(template, message):
  class Chat(tokenizers.ByteTokenizer):
    chat_template = template
  with pytest.raises(DataError, match="^" + re.escape(f"f.jsonl line 3: {message}")):
    sft.encode(sft.Example("f.jsonl line 3", prompt="hi", completion="ok"), Chat())
