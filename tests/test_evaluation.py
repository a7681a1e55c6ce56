"""Evaluation: named eval sets with bits per byte, and `bigflax eval` on exports, checkpoints and
imported Hugging Face models."""

import json
import math

import jax
import numpy as np
import pytest

from bigflax import train
from bigflax.data import cache, tokenizers
from bigflax.errors import ConfigError
from bigflax.evaluation import sets
from bigflax.rundir import read_metrics
from conftest import in_process, tiny_config

ONE_DEVICE = jax.devices()[:1]
TEXTS = ["hello world", "  two leading spaces and a tab\there", "héllo ✓ wörld 🙂\nnext line",
         "x", "the quick brown fox jumps over the lazy dog " * 5]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory, corpus_file):
  path = tmp_path_factory.mktemp("sp") / "sp.model"
  tokenizer = tokenizers.train_sentencepiece([corpus_file.read_bytes()], str(path),
                                             vocab_size=300, model_type="bpe")
  tokenizer.path = str(path)
  return tokenizer


def one_row(tokens: np.ndarray) -> dict:
  """A packed row holding one document: predictions of tokens[1:] from tokens[:-1]."""
  tokens = np.asarray(tokens, np.int32)[None]
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((1, tokens.shape[1] - 1), np.float32)}


def bits_per_byte(tokenizer, document: bytes, nats: float) -> float:
  """bpb of one document whose evaluated tokens the model gives probability e^-nats, through the
  evaluator's own byte count and summary."""
  batch = one_row(tokenizer.encode_document(document, "test"))
  counted = sets.target_bytes(tokenizer, tokenizer.byte_lengths(), batch).sum()
  n = batch["loss_mask"].sum()
  return sets.summary({"loss_sum": nats, "correct": 0.0, "num_tokens": n, "bytes": counted})


@pytest.mark.parametrize("text", TEXTS)
def test_bits_per_byte_is_the_same_whatever_the_tokenizer(text, sentencepiece):
  """A byte-level run and a sentencepiece run that give the same text the same probability get
  the same bits per byte. The byte run's first byte is context, not a prediction, so its document
  starts with one byte more; sentencepiece's starts with BOS (no byte) and adds the dummy-prefix
  space (no byte of the text either)."""
  raw, nats = text.encode(), 3.7 * len(text)
  byte_run = bits_per_byte(tokenizers.ByteTokenizer(), b"\n" + raw, nats)
  sp_run = bits_per_byte(sentencepiece, raw, nats)
  assert sp_run["bpb"] == pytest.approx(byte_run["bpb"], rel=1e-12)
  assert byte_run["bpb"] == pytest.approx(nats / math.log(2) / len(raw), rel=1e-12)
  assert byte_run["bpb"] == pytest.approx(byte_run["loss"] / math.log(2), rel=1e-12)
  assert sp_run["loss"] != pytest.approx(byte_run["loss"])  # per token they differ
  chars = tokenizers.CharTokenizer(tokenizers.CharTokenizer.charset_of("\n" + text))
  assert bits_per_byte(chars, b"\n" + raw, nats)["bpb"] == pytest.approx(byte_run["bpb"])


def test_byte_lengths_of_each_tokenizer(sentencepiece):
  assert (tokenizers.ByteTokenizer().byte_lengths() == 1).all()
  assert list(tokenizers.CharTokenizer("aé✓🙂").byte_lengths()) == [1, 2, 3, 4]
  lengths = sentencepiece.byte_lengths()
  assert lengths.dtype == np.int64 and lengths.shape == (sentencepiece.vocab_size,)
  assert list(lengths[:3]) == [0, 0, 0]  # <unk>, BOS, EOS
  assert (lengths[3:3 + 256] == 1).all()  # the byte pieces
  for text in TEXTS:  # inside a text every piece's bytes are the text's, spaces included
    ids = sentencepiece.encode("a " + text)
    assert lengths[ids].sum() == len(("a " + text).encode()) + 1  # + the dummy prefix


def test_eval_sets_log_every_set_and_bpb_is_loss_over_ln2_for_bytes(tmp_path, corpus_file):
  other = tmp_path / "other.jsonl"
  other.write_text("".join(json.dumps({"text": f"document {i}: " + "abc " * i}) + "\n"
                           for i in range(1, 9)))
  config = tiny_config(corpus_file, **{"data.tokenizer": "byte", "eval_batches": 0,
                                       "eval.sets": f"val;more=jsonl:{other}",
                                       "steps": 2, "eval_every": 2})
  result = train.train(config, str(tmp_path / "run"), devices=ONE_DEVICE, print_fn=lambda s: 0)
  records = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
  assert len(records) == 1 and records[0]["step"] == 2
  for metric in ("loss", "perplexity", "accuracy", "bpb", "documents"):
    assert f"eval_{metric}" in result and f"eval/more/{metric}" in result
    assert records[0][f"eval/more/{metric}"] == pytest.approx(result[f"eval/more/{metric}"])
  assert result["eval/more/documents"] == 8  # eval_batches=0: the whole set
  for name in ("eval_", "eval/more/"):  # one byte per token
    assert result[f"{name}bpb"] == pytest.approx(result[f"{name}loss"] / math.log(2), rel=1e-9)
    assert result[f"{name}perplexity"] == pytest.approx(math.exp(result[f"{name}loss"]))
  assert 4.0 < result["eval/more/loss"] < 7.0  # near ln 256 after 2 steps


def test_a_masked_lm_reports_no_bits_per_byte(corpus_file):
  # Its loss reads the ~15% masked tokens only: divided by every token's bytes it would look
  # several times better than it is.
  trainer = train.Trainer(tiny_config(corpus_file, objective="mlm", **{"model.causal": False}),
                          devices=ONE_DEVICE)
  record = trainer.evaluate()
  assert record["eval_loss"] > 0 and "eval_bpb" not in record


def test_an_sft_set_counts_the_completions_only(tmp_path, corpus_file):
  examples = [{"prompt": f"question {i}? ", "completion": "answer " * (i + 1)} for i in range(5)]
  chat = tmp_path / "chat.jsonl"
  chat.write_text("".join(json.dumps(e) + "\n" for e in examples))
  config = tiny_config(corpus_file, **{"data.tokenizer": "byte", "eval_batches": 0,
                                       "eval.sets": f"chat=sft:{chat}"})
  trainer = train.Trainer(config, devices=ONE_DEVICE)
  [chat_set] = trainer.evaluator().sets
  batches = list(chat_set.batches)
  counted = sum(b["loss_mask"].sum() for b in batches)
  assert counted == sum(len(e["completion"]) for e in examples)  # every completion byte once
  m = trainer.evaluate()
  assert m["eval/chat/documents"] == 5 and "eval_loss" not in m
  assert m["eval/chat/bpb"] == pytest.approx(m["eval/chat/loss"] / math.log(2))


def test_whole_set_bytes_are_the_documents_bytes_under_sentencepiece(tmp_path, corpus_file,
                                                                     sentencepiece):
  """eval_batches=0 over packed rows cut across documents, 8 devices: the bytes counted are every
  val document's bytes, once (BOS, EOS and the dummy prefix are no text)."""
  config = tiny_config(corpus_file, **{
      "data.tokenizer": "sentencepiece", "data.tokenizer_model": sentencepiece.path,
      "data.documents": "paragraph", "eval_batches": 0, "mesh.data": -1})
  trainer = train.Trainer(config)
  m = trainer.evaluate_sets()["val"]
  val_set = trainer.evaluator().sets[0]
  counted = m["loss"] * val_set.info.predictions / (m["bpb"] * math.log(2))
  documents = trainer.corpus.val
  expected = sum(len(documents[i]) for i in range(len(documents)))
  assert counted == pytest.approx(expected, rel=1e-6)


def test_bad_eval_sets_are_refused_in_one_line(tmp_path, corpus_file):
  for spec, message in (("val;web=ftp:/x", r"set 'web': unknown source 'ftp'; use one of"),
                        ("nonsense", r"part 'nonsense' is not 'val' or NAME=KIND:WHERE"),
                        ("val=text:/x", "the name 'val' is the run's own val split"),
                        ("a=text:/x;a=text:/y", "names a set twice")):
    with pytest.raises(ConfigError, match=message):
      sets.parse(spec)
  # A token cache built with another tokenizer than the model's.
  shard = tmp_path / "s0.jsonl"
  shard.write_text('{"text": "some text"}\n')
  built = tiny_config(shard, **{"data.source": "jsonl", "data.tokenizer": "byte"})
  cache.prepare(built.data, str(tmp_path / "cache"))
  config = tiny_config(corpus_file, **{"eval.sets": f"val;c=cache:{tmp_path / 'cache'}"})
  with pytest.raises(ConfigError, match=r"the token cache .* was built with the tokenizer byte "
                     r"\(hash byte\), not the model's char"):
    train.Trainer(config, devices=ONE_DEVICE).evaluator()



@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_file):
  """A tiny run on 8 devices with checkpoints at steps 2 and 4 and its export."""
  workdir = tmp_path_factory.mktemp("eval") / "run"
  config = tiny_config(corpus_file, **{"mesh.data": -1, "checkpoint_every": 2,
                                       "eval_batches": 0})
  train.train(config, str(workdir), print_fn=lambda s: 0)
  return workdir


def test_bigflax_eval_reproduces_the_training_eval_on_another_mesh(finished_run, capsys):
  records = {r["step"]: r for r in read_metrics(finished_run) if "eval_loss" in r}
  code, out, err = in_process(capsys, "eval", f"--workdir={finished_run}", "--step=2",
                              "--config.mesh.data=2", "--config.mesh.fsdp=2",
                              "--config.mesh.tensor=2")
  assert code == 0, err
  written = json.loads((finished_run / "eval_2.json").read_text())
  assert written["step"] == 2 and written["params"] == "checkpoint"
  for metric in ("loss", "accuracy", "bpb", "documents"):
    assert written["sets"]["val"][metric] == pytest.approx(records[2][f"eval_{metric}"],
                                                           rel=1e-5)
  assert "val" in out and "bpb" in out and f"wrote {finished_run / 'eval_2.json'}" in out
  # The export, with another set given on the command line: a set that is not there.
  code, out, err = in_process(capsys, "eval", f"--workdir={finished_run}",
                              f"--config.eval.sets=val;gone=text:{finished_run}/missing.txt")
  assert code == 1 and "Traceback" not in err
  assert f"error: config.eval.sets set 'gone' (text:{finished_run}/missing.txt): " in err
  assert not (finished_run / "eval_final.json").exists()


def test_bigflax_eval_refuses_what_would_be_lost_or_does_not_exist(finished_run, capsys):
  code, _, err = in_process(capsys, "eval", f"--workdir={finished_run}", "--step=3")
  assert code == 1 and "Traceback" not in err
  assert (f"error: --step 3: {finished_run} has no checkpoint of step 3; its checkpoints are "
          "steps [2, 4] (or drop --step to evaluate its params/ export)") in err
  code, _, err = in_process(capsys, "eval", f"--workdir={finished_run}")
  assert code == 0, err
  before = (finished_run / "eval_final.json").read_bytes()
  code, _, err = in_process(capsys, "eval", f"--workdir={finished_run}")
  assert code == 1 and f"error: {finished_run / 'eval_final.json'} exists" in err
  assert "--overwrite" in err and (finished_run / "eval_final.json").read_bytes() == before
  code, _, err = in_process(capsys, "eval", f"--workdir={finished_run}", "--overwrite",
                            "--config.eval.sets=val;w=ftp:/x")
  assert code == 1 and "error: config.eval.sets set 'w': unknown source 'ftp'" in err
  assert (finished_run / "eval_final.json").read_bytes() == before


@pytest.mark.slow
def test_bigflax_eval_on_an_imported_hugging_face_model_matches_transformers(tmp_path, capsys):
  """A converted GPT-2 with its own BPE, one document that fits one row: bigflax eval's loss is
  transformers' mean next-token loss on it, and its bits per byte counts the document's bytes."""
  import torch  # noqa: PLC0415 - the test extra has it; never skipped
  from test_interop import _convert_hf_tool, save_hf_gpt2_with_tokenizer
  model, tokenizer = save_hf_gpt2_with_tokenizer(tmp_path / "hf")
  _convert_hf_tool().main(["to_bigflax", str(tmp_path / "hf"), str(tmp_path / "run")])
  text = "def greet(name):\n    return f'héllo {name} ✓'\n"
  (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
  code, out, err = in_process(
      capsys, "eval", f"--workdir={tmp_path / 'run'}", f"--config.eval.sets=doc=jsonl:"
      f"{tmp_path / 'doc.jsonl'}", "--config.eval_batches=0", "--config.batch_size=8",
      "--config.mesh.data=-1")
  assert code == 0, err
  result = json.loads((tmp_path / "run" / "eval_final.json").read_text())["sets"]["doc"]
  ids = tokenizer(text, return_tensors="pt")["input_ids"]
  with torch.no_grad():
    expected = float(model(ids, labels=ids).loss)
  assert result["loss"] == pytest.approx(expected, rel=1e-5)
  first = len(tokenizer.decode(ids[0, :1]).encode())  # the first token is context only
  assert result["bpb"] == pytest.approx(
      expected * (ids.shape[1] - 1) / math.log(2) / (len(text.encode()) - first), rel=1e-5)


def write_local_tasks(directory) -> None:
  """Two lm-eval tasks over local JSON-lines files (nothing fetched): multiple choice and
  rolling perplexity."""
  directory.mkdir()
  rng = np.random.default_rng(0)
  words = "the quick brown fox jumps over a lazy dog while birds sing".split()
  say = lambda n: " ".join(rng.choice(words, n))
  tasks = {
      "local_choice": ([{"question": say(5), "choices": [say(2) for _ in range(3)],
                         "answer": int(rng.integers(3))} for _ in range(6)],
                       "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                       "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                       "metric_list:\n  - metric: acc\n"),
      "local_perplexity": ([{"text": say(n)} for n in (4, 9, 30)],
                           "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                           "doc_to_target: '{{text}}'\nmetric_list:\n"
                           "  - metric: bits_per_byte\n"),
  }
  for name, (rows, spec) in tasks.items():
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / name}.jsonl\ntest_split: test\nnum_fewshot: 0\n{spec}")


@pytest.mark.slow
def test_harness_tasks_run_in_the_loop_and_offline_alike(tmp_path, corpus_file, capsys,
                                                         monkeypatch):
  import lm_eval  # noqa: F401, PLC0415 - the test extra has it; never skipped
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  write_local_tasks(tmp_path / "tasks")
  config = tiny_config(corpus_file, **{
      "data.tokenizer": "byte", "mesh.data": -1, "steps": 4, "eval.harness_every": 2,
      "eval.harness_tasks": "local_choice,local_perplexity",
      "eval.harness_include": str(tmp_path / "tasks")})
  train.train(config, str(tmp_path / "run"), print_fn=lambda s: 0)
  records = read_metrics(tmp_path / "run")
  harness = [r for r in records if any(k.startswith("harness/") for k in r)]
  assert [r["step"] for r in harness] == [2, 4]
  final = harness[-1]
  assert 0 <= final["harness/local_choice/acc"] <= 1
  assert 4 < final["harness/local_perplexity/bits_per_byte"] < 12  # near log2(256) untrained
  assert all("harness/local_choice/acc" not in r for r in records if "loss" in r)
  # bigflax eval --tasks on the export gives the loop's final numbers.
  code, _, err = in_process(capsys, "eval", f"--workdir={tmp_path / 'run'}",
                            "--tasks=local_choice,local_perplexity", "--config.eval.sets=val",
                            f"--config.eval.harness_include={tmp_path / 'tasks'}")
  assert code == 0, err
  offline = json.loads((tmp_path / "run" / "eval_final.json").read_text())["harness"]
  for key, value in final.items():
    if key.startswith("harness/"):
      _, task, metric = key.split("/")
      assert offline[task][metric] == pytest.approx(value, rel=1e-5), key
  code, _, err = in_process(capsys, "eval", f"--workdir={tmp_path / 'run'}", "--overwrite",
                            "--tasks=local_choise")
  assert code == 1 and "no task 'local_choise'" in err
