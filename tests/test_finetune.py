"""Fine-tuning: the classifier head, LoRA adapters, what trains (optax masking), the merged
export and `bigflax predict`."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from bigflax import checkpoint, data, interop, pretrained, rundir, run, sharding, train
from bigflax.config import ModelConfig, base
from bigflax.errors import CheckpointError, ConfigError, InteropError
from bigflax.layers import merge_lora
from bigflax.model import Transformer
from conftest import in_process, run_bigflax, tiny_config

CFG = ModelConfig(vocab_size=64, block_size=16, num_layers=2, num_heads=2, embed_dim=32)
LABELS = ("neg", "neu", "pos")


def tiny(**overrides):
  """A classify config (byte tokenizer, 3 labels), resolved, on one device."""
  c = base()
  c.task = "classify"
  c.batch_size, c.steps, c.mesh.data = 8, 40, 1
  c.optimizer.warmup_steps, c.optimizer.schedule = 0, "constant"
  c.model.update(block_size=16, num_layers=2, num_heads=2, embed_dim=32)
  c.update_from_flattened_dict(overrides)
  run.check(c)
  return run.resolve(c, data.make_tokenizer(c.data), labels=LABELS)


def classify_batch(seed=0, rows=8, length=16):
  """Right-padded rows whose label is their first byte's class (mod 3); the last row pads."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, length + 1, rows)
  real = np.arange(length)[None] < lengths[:, None]
  inputs = np.where(real, rng.integers(97, 123, (rows, length)), 0).astype(np.int32)
  labels = (inputs[:, 0] % 3).astype(np.int32)
  labels[-1] = -1
  return {"inputs": inputs, "segment_ids": real.astype(np.int32),
          "positions": np.where(real, np.arange(length), 0).astype(np.int32), "labels": labels}


def steps(r, state, batches, seed=1):
  metrics = []
  with r.activate():
    for batch in batches:
      state, m = r.train_step(state, sharding.global_batch(batch, r.batch_sharding),
                              jax.random.key(seed))
      metrics.append(jax.device_get(m))
  return state, metrics


@pytest.mark.parametrize("causal", [True, False])
def test_the_classifier_reads_the_last_real_token_of_a_decoder_and_the_first_of_an_encoder(
    causal):
  cfg = dataclasses.replace(CFG, causal=causal, num_labels=3)
  model = Transformer(cfg)
  batch = {k: jnp.asarray(v) for k, v in classify_batch().items()}
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  params = model.init(jax.random.key(0), *args)["params"]
  logits, hidden = model.apply({"params": params}, *args, capture_intermediates=True,
                               mutable=["intermediates"])
  hidden = hidden["intermediates"]["norm_final"]["__call__"][0]
  assert logits.shape == (8, 3) and "lm_head" not in params
  last = np.asarray(batch["segment_ids"]).sum(1) - 1
  read = hidden[jnp.arange(8), last if causal else 0]
  head = nn.unbox(params)["classifier"]
  np.testing.assert_allclose(logits, read @ head["kernel"] + head["bias"], rtol=1e-5, atol=1e-6)


def test_classification_fine_tuning_learns_and_reports_accuracy_and_macro_f1():
  r = run.build(tiny(), jax.devices()[:1])
  state = r.init_state(jax.random.key(0))
  batches = [classify_batch(i % 4) for i in range(20)]
  state, metrics = steps(r, state, batches)
  assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
  with r.activate():
    totals = jax.device_get(r.eval_step(state, sharding.global_batch(batches[0],
                                                                     r.batch_sharding)))
  assert totals["num_examples"] == 7 and totals["confusion"].sum() == 7  # the padding row: none
  summary = run.eval_summary(totals)
  assert set(summary) == {"loss", "accuracy", "macro_f1"} and summary["accuracy"] == 1.0
  assert summary["macro_f1"] == 1.0


def lora_cfg(**changes):
  return dataclasses.replace(CFG, **{"lora_rank": 4, "lora_alpha": 8.0,
                                     "lora_targets": ("query", "value", "out", "up", "down"),
                                     **changes})


def apply(cfg, params, tokens):
  return jax.jit(Transformer(cfg).apply)({"params": params}, tokens)


def test_lora_adapters_sit_on_their_targets_and_start_as_the_base_model():
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  boxed = jax.jit(Transformer(lora_cfg()).init)(jax.random.key(0), tokens)["params"]
  specs = nn.get_partition_spec(boxed)["block_0"]
  params = nn.unbox(boxed)
  attn, mlp = params["block_0"]["attn"], params["block_0"]["mlp"]
  assert attn["query"]["lora_a"].shape == (32, 4) and attn["query"]["lora_b"].shape == (4, 2, 16)
  assert attn["out"]["lora_a"].shape == (2, 16, 4) and attn["out"]["lora_b"].shape == (4, 32)
  assert mlp["down"]["lora_a"].shape == (128, 4) and "lora_a" not in attn["key"]
  assert specs["attn"]["query"]["lora_a"] == P("embed", "lora")
  assert specs["attn"]["query"]["lora_b"] == P("lora", "heads", "head_dim")
  assert specs["mlp"]["up"]["lora_b"] == P("lora", "mlp")
  base_params = merge_lora(params, lora_cfg())  # B = 0: the kernels unchanged, adapters gone
  np.testing.assert_array_equal(base_params["block_0"]["attn"]["query"]["kernel"],
                                attn["query"]["kernel"])
  np.testing.assert_allclose(apply(lora_cfg(), params, tokens), apply(CFG, base_params, tokens),
                             atol=1e-6, rtol=0)


def without_adapters(tree):
  if not isinstance(tree, dict):
    return tree
  return {k: without_adapters(v) for k, v in tree.items() if not k.startswith("lora_")}


@pytest.mark.parametrize("scan", [False, True])
def test_merging_the_adapters_gives_the_same_logits(scan):
  cfg = lora_cfg(scan_layers=scan, mlp="swiglu", lora_targets=("query", "key", "gate", "down"))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens))["params"]
  # Trained adapters: B is no longer zero.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: jax.random.normal(jax.random.key(len(str(path))), x.shape) * 0.05
      if "lora_b" in str(path) else x, params)
  merged = merge_lora(params, cfg)
  assert "lora_a" not in str(jax.tree_util.tree_structure(merged))
  with_adapters = apply(cfg, params, tokens)
  plain = apply(dataclasses.replace(cfg, lora_rank=0), merged, tokens)
  base_only = apply(dataclasses.replace(cfg, lora_rank=0), without_adapters(params), tokens)
  assert np.abs(np.asarray(with_adapters - base_only)).max() > 1e-3  # the adapters matter
  np.testing.assert_allclose(plain, with_adapters, atol=1e-5, rtol=0)


def adam_leaves(opt_state) -> list[str]:
  """The paths of the Adam first moments that hold an array."""
  found = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
    text = jax.tree_util.keystr(path)
    if ".mu" in text and hasattr(leaf, "shape"):
      found.append(text)
  return found


def test_lora_trains_the_adapters_and_head_only_and_frozen_params_have_no_optimizer_state():
  r = run.build(tiny(**{"finetune.lora_rank": 4}), jax.devices()[:1])
  assert r.config.finetune.trainable == "lora"
  state = r.init_state(jax.random.key(0))
  moments = adam_leaves(state.opt_state)
  assert moments and all("lora_" in m or "classifier" in m for m in moments)
  assert len(moments) == 2 * 2 * 2 + 2  # 2 layers × (query, value) × (A, B) + head kernel, bias
  before = jax.device_get(state.params)
  state, metrics = steps(r, state, [classify_batch(i) for i in range(3)])
  after = jax.device_get(state.params)

  def moved(path, a, b):
    return jax.tree_util.keystr(path), not np.array_equal(a, b)
  changes = dict(jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(
      moved, before, after), is_leaf=lambda x: isinstance(x, tuple)))
  assert all(changed == ("lora_" in name or "classifier" in name)
             for name, changed in changes.items()), changes
  assert np.isfinite(metrics[-1]["grad_norm"]) and metrics[-1]["grad_norm"] > 0


def test_head_only_training_moves_the_classifier_alone():
  r = run.build(tiny(**{"finetune.trainable": "head"}), jax.devices()[:1])
  state = r.init_state(jax.random.key(0))
  assert all("classifier" in m for m in adam_leaves(state.opt_state))
  before = jax.device_get(state.params)
  state, _ = steps(r, state, [classify_batch(0)] * 2)
  after = jax.device_get(state.params)
  assert not np.array_equal(before["classifier"]["kernel"], after["classifier"]["kernel"])
  for name in ("token_embed", "block_0", "norm_final"):
    jax.tree.map(np.testing.assert_array_equal, before[name], after[name])


def test_adapters_are_sharded_like_their_base_weights():
  c = tiny(**{"finetune.lora_rank": 4, "finetune.lora_targets": ("query", "up", "down"),
              "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2})
  params = run.build(c, jax.devices()[:4]).state_shardings.params["block_0"]
  assert params["attn"]["query"]["kernel"].spec == P("fsdp", "tensor", None)
  assert params["attn"]["query"]["lora_a"].spec == P("fsdp", None)  # rank: unsplit
  assert params["attn"]["query"]["lora_b"].spec == P(None, "tensor", None)
  assert params["mlp"]["down"]["lora_a"].spec == P("tensor", None)
  assert params["mlp"]["down"]["lora_b"].spec == P(None, "fsdp")


@pytest.mark.parametrize("overrides, message", [
    ({"finetune.lora_rank": 40, "model.num_kv_heads": 1, "finetune.lora_targets": ("key",)},
     "lora_rank=40 exceeds the key projection's width 32"),
    ({"finetune.lora_rank": 4, "finetune.lora_targets": ("qkv",)}, "names 'qkv'"),
    ({"finetune.lora_rank": 4, "finetune.lora_targets": ("gate",)}, "names 'gate'"),
    ({"finetune.trainable": "lora"}, "lora_rank=0 adds none"),
    ({"task": "lm", "finetune.trainable": "head"}, "only config.task='classify' has"),
    ({"finetune.trainable": "some"}, "trainable='some' is unknown"),
    ({"task": "lm", "model.num_labels": 3}, "set config.task=classify"),
    ({"task": "regress"}, "config.task='regress' is unknown"),
])
def test_fine_tuning_config_errors(overrides, message):
  c = base()
  c.task = "classify"
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    run.check(c)


def test_a_classifier_needs_labels_from_its_data():
  c = base()
  c.task = "classify"
  with pytest.raises(ConfigError, match="found no labels"):
    run.resolve(c, data.make_tokenizer(c.data))
  c.model.num_labels = 2
  with pytest.raises(ConfigError, match="num_labels=2 but the train split has 3 labels"):
    run.resolve(c, data.make_tokenizer(c.data), labels=LABELS)


def test_masked_lm_steps_lower_the_loss_and_a_step_is_a_function_of_its_key():
  c = base()
  c.objective, c.model.causal, c.batch_size, c.steps, c.mesh.data = "mlm", False, 8, 30, 1
  c.optimizer.warmup_steps, c.optimizer.schedule = 0, "constant"
  c.model.update(block_size=16, num_layers=2, num_heads=2, embed_dim=32)
  r = run.build(run.resolve(c, data.make_tokenizer(c.data)), jax.devices()[:1])
  assert r.config.mlm.mask_token_id == 256
  text = np.frombuffer(b"the quick brown fox jumps over the lazy dog " * 8, np.uint8)
  rows = np.stack([text[i * 5:i * 5 + 16] for i in range(8)]).astype(np.int32)
  batch = {"inputs": rows, "targets": rows, "loss_mask": np.ones((8, 16), np.float32),
           "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.broadcast_to(np.arange(16), (8, 16)).astype(np.int32)}
  state = r.init_state(jax.random.key(0))
  first = steps(r, r.init_state(jax.random.key(0)), [batch])[1][0]
  assert first == steps(r, r.init_state(jax.random.key(0)), [batch])[1][0]  # same masks
  assert first != steps(r, r.init_state(jax.random.key(0)), [batch], seed=2)[1][0]
  _, metrics = steps(r, state, [batch] * 30)
  # Each step masks other tokens, so the loss is noisy: the last five against the first.
  assert np.mean([m["loss"] for m in metrics[-5:]]) < 0.6 * metrics[0]["loss"]


def write_run(directory, config, params):
  directory.mkdir(parents=True, exist_ok=True)
  rundir.write_config(config, directory)
  rundir.export_params(directory, params)
  return directory


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
  """A classifier's run directory (a LoRA one with trained-looking adapters) and its model."""
  config = tiny(**{"finetune.lora_rank": 2})
  r = run.build(config, jax.devices()[:1])
  params = jax.device_get(r.init_state(jax.random.key(0)).params)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, 0.03) if "lora_b" in str(path) else x, params)
  return write_run(tmp_path_factory.mktemp("runs") / "classifier", config, params), r.model



def test_predict_writes_each_texts_label_and_probabilities(classifier_run, tmp_path, capsys):
  workdir, model = classifier_run
  texts = ["good movie", "bad film, very bad", "it was fine I suppose"]
  source = tmp_path / "in.jsonl"
  source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  output = tmp_path / "out.jsonl"
  code, out, err = in_process(capsys, "predict", f"--workdir={workdir}", f"--input={source}",
                              f"--output={output}")
  assert code == 0, err
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(lines) == 3 and "3 predictions" in out
  _, _, params, _ = rundir.load_run(workdir)
  for text, line in zip(texts, lines):
    tokens = jnp.asarray([list(text.encode())[:16]])  # cut to block_size, as predict does
    expected = np.asarray(jax.nn.softmax(jax.jit(model.apply)({"params": params}, tokens)))[0]
    assert list(line["probabilities"]) == list(LABELS)
    np.testing.assert_allclose(list(line["probabilities"].values()), expected, rtol=1e-5)
    assert line["label"] == LABELS[int(np.argmax(expected))]
  # An existing output is not overwritten, unless asked.
  output.write_text("keep me\n")
  code, _, err = in_process(capsys, "predict", f"--workdir={workdir}", f"--input={source}",
                            f"--output={output}")
  assert code == 1 and "--output" in err and "exists" in err and err.count("\n") == 1
  assert output.read_text() == "keep me\n"
  code, _, err = in_process(capsys, "predict", f"--workdir={workdir}", f"--input={source}",
                            f"--output={output}", "--overwrite")
  assert code == 0 and len(output.read_text().splitlines()) == 3


def test_predict_bad_input_is_one_line(classifier_run, tmp_path, capsys):
  workdir, _ = classifier_run
  unseen = tmp_path / "unseen.jsonl"
  unseen.write_text(json.dumps({"text": "hi", "label": "pos"}) + "\n"
                    + json.dumps({"text": "yo", "label": "angry"}) + "\n")
  output = tmp_path / "never.jsonl"
  for args, message in (
      ([f"--input={unseen}", f"--output={output}"], "'angry' is not one of the training labels"),
      ([f"--input={tmp_path / 'missing.jsonl'}"], "no such file"),
      ([], "needs --workdir DIR")):
    code, _, err = in_process(capsys, "predict", f"--workdir={workdir}", *args)
    assert code == 1 and message in err and err.count("\n") == 1, err
  assert not output.exists()


def test_export_merge_writes_a_plain_run_with_the_same_logits(classifier_run, tmp_path, capsys):
  workdir, _ = classifier_run
  target = tmp_path / "merged"
  code, _, err = in_process(capsys, "export", f"--workdir={workdir}", f"--output={target}")
  assert code == 1 and "pass --merge" in err and not target.exists()
  code, _, err = in_process(capsys, "export", f"--workdir={workdir}", f"--output={target}",
                            "--merge")
  assert code == 0, err
  config, model, params, _ = rundir.load_run(target)
  assert config.finetune.lora_rank == 0 and model.cfg.lora_rank == 0
  assert "lora_a" not in str(jax.tree_util.tree_structure(params))
  _, source_model, source_params, _ = rundir.load_run(workdir)
  batch = classify_batch(3)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, *args),
                             jax.jit(source_model.apply)({"params": source_params}, *args),
                             atol=1e-5, rtol=0)
  before = sorted(p.name for p in target.iterdir())
  code, _, err = in_process(capsys, "export", f"--workdir={workdir}", f"--output={target}",
                            "--merge")
  assert code == 1 and "exists and is not empty" in err
  assert sorted(p.name for p in target.iterdir()) == before


@pytest.mark.slow
def test_predict_from_the_command_line(classifier_run, tmp_path):
  workdir, _ = classifier_run
  source = tmp_path / "in.csv"
  source.write_text("text\nfirst text\nsecond one\n")
  result = run_bigflax("predict", "--workdir", workdir, "--input", source)
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [line["label"] in LABELS for line in lines] == [True, True]
  assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-5 for line in lines)


@pytest.mark.parametrize("changes, message", [
    ({"num_labels": 3}, "is a classifier"), ({"causal": False}, "is bidirectional"),
    ({"lora_rank": 2}, "bigflax export --merge")])
def test_transformers_interop_refuses_what_only_bigflax_has(changes, message):
  with pytest.raises(InteropError, match=message):
    interop.family_of(dataclasses.replace(CFG, **changes))
  assert interop.family_of(CFG) == "gpt2"


@pytest.mark.slow
def test_pretrain_an_encoder_then_lora_fine_tune_a_classifier_export_and_predict(
    tmp_path, corpus_file, capsys):
  """The whole path: MLM pretraining, a classifier initialised from it with LoRA, the merged
  export, and predictions from both that agree."""
  rng = np.random.default_rng(0)
  words = {"pos": ["good", "great", "nice"], "neg": ["bad", "awful", "sad"]}
  examples = tmp_path / "examples.jsonl"
  examples.write_text("".join(
      json.dumps({"text": " ".join(rng.choice(words[label], 3)), "label": label}) + "\n"
      for label in rng.choice(["pos", "neg"], 160)))
  devices = jax.devices()[:1]
  encoder = tmp_path / "encoder"
  train.train(tiny_config(corpus_file, **{"objective": "mlm", "model.causal": False,
                                          "data.tokenizer": "byte", "steps": 20}),
              str(encoder), print_fn=lambda *_: None, devices=devices)
  classifier = tmp_path / "classifier"
  last = train.train(tiny_config(examples, **{
      "task": "classify", "init_from": str(encoder), "data.tokenizer": "byte",
      "finetune.lora_rank": 4, "steps": 60, "eval_every": 60, "optimizer.warmup_steps": 0,
      "optimizer.learning_rate": 1e-2, "optimizer.schedule": "constant"}), str(classifier),
      print_fn=lambda *_: None, devices=devices)
  config = rundir.read_config(classifier)
  assert config.model.causal is False and config.finetune.trainable == "lora"
  assert last["eval_accuracy"] >= 0.9 and "eval_macro_f1" in last
  merged = tmp_path / "merged"
  assert in_process(capsys, "export", f"--workdir={classifier}", f"--output={merged}",
                    "--merge")[0] == 0
  source = tmp_path / "in.jsonl"
  source.write_text(json.dumps({"text": "good nice great"}) + "\n"
                    + json.dumps({"text": "sad bad awful"}) + "\n")
  outputs = []
  for workdir in (classifier, merged):
    code, out, err = in_process(capsys, "predict", f"--workdir={workdir}", f"--input={source}")
    assert code == 0, err
    outputs.append([json.loads(line) for line in out.splitlines()])
  assert [line["label"] for line in outputs[0]] == ["pos", "neg"]
  for a, b in zip(*outputs):
    np.testing.assert_allclose(list(a["probabilities"].values()),
                               list(b["probabilities"].values()), atol=1e-5)



# A LoRA run's checkpoints: the adapters (and what else trains) plus a reference to the base.

LORA = {"data.tokenizer": "byte", "finetune.lora_rank": 2, "model.embed_dim": 64}
ONE_DEVICE = jax.devices()[:1]


@pytest.fixture(scope="module")
def lora_base(tmp_path_factory):
  """A base LM run directory (its init's params, exported): what the LoRA runs start from."""
  c = tiny_config("unused", **{"data.tokenizer": "byte", "model.embed_dim": 64})
  c = run.resolve(c, data.make_tokenizer(c.data))
  params = run.build(c, ONE_DEVICE).init_state(jax.random.key(7)).params
  return write_run(tmp_path_factory.mktemp("runs") / "base", c, params)


def lora_config(corpus_file, base, **overrides):
  return tiny_config(corpus_file, init_from=str(base), **{**LORA, **overrides})


def flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(lora_base, corpus_file,
                                                                  tmp_path):
  base = shutil.copytree(lora_base, tmp_path / "base")  # moved away at the end
  workdir = tmp_path / "run"
  trainer = train.Trainer(lora_config(corpus_file, base), devices=ONE_DEVICE)
  trainer.step(0)
  workdir.mkdir()
  rundir.write_config(trainer.config, workdir)
  checkpointer = checkpoint.Checkpointer(str(workdir), trainer.config)
  trainer.save(checkpointer, 1)
  checkpointer.close()

  with ocp.CheckpointManager(workdir / "checkpoints",
                             item_handlers={"state": ocp.StandardCheckpointHandler()},
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    metadata = manager.metadata(1)
  stored = flat(metadata.item_metadata["state"].tree["params"])
  assert len(stored) == 2 * 2 * 2 and all("lora_" in path for path in stored)  # layers, q/v, A/B
  assert metadata.custom_metadata["frozen_base"] == {"init_from": str(base.absolute()),
                                                     "trainable": "lora"}
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.state.params))
  files = [p for p in (workdir / "checkpoints" / "1").rglob("*") if p.is_file()]
  arrays = sum(p.stat().st_size for p in files if p.parent.name == "d")  # OCDBT's data blocks
  # The adapters and their moments: a few % of the params (the full state would be ~3x them;
  # OCDBT's data blocks vary a little in size from run to run).
  assert arrays < 0.1 * params_bytes, (arrays, params_bytes)
  # With the tree metadata (a line per leaf, frozen ones included), config and data position.
  assert sum(p.stat().st_size for p in files) < 0.4 * params_bytes

  # load_run fills the frozen params in from the base: the trainer's params, all of them.
  loaded, trained = flat(rundir.load_run(workdir, step=1)[2]), flat(trainer.state.params)
  base_params = flat(rundir.load_run(base)[2])
  assert loaded.keys() == trained.keys()
  for path, value in loaded.items():
    np.testing.assert_array_equal(value, trained[path], err_msg=path)
    if "lora_" not in path:
      np.testing.assert_array_equal(value, base_params[path], err_msg=path)

  # Read back onto its own run (what `bigflax eval --step 1` does), adapters included.
  evaluated = flat(pretrained.load_params(f"{workdir}:1", trainer.run))
  for path, value in evaluated.items():
    np.testing.assert_array_equal(value, trained[path], err_msg=path)
  # A run without adapters cannot start from it: the adapters would be dropped without a word.
  with pytest.raises(ConfigError, match=r"is a LoRA run, and this run has no adapters .*"
                     r"\(bigflax export --workdir SOURCE --merge"):
    train.Trainer(lora_config(corpus_file, f"{workdir}:1", **{"finetune.lora_rank": 0,
                                                               "finetune.trainable": "all"}),
                  devices=ONE_DEVICE)

  # A run that trains every param refuses it: the checkpoint lacks the frozen ones.
  full = train.Trainer(lora_config(corpus_file, base, **{"finetune.trainable": "all"}),
                       devices=ONE_DEVICE, resuming=True)
  checkpointer = checkpoint.Checkpointer(str(workdir), full.config)
  try:
    with pytest.raises(CheckpointError) as error:
      full.restore(checkpointer, 1)
  finally:
    checkpointer.close()
  assert "\n" not in str(error.value)
  assert ("holds only the params config.finetune.trainable='lora' trains, over the frozen base "
          f"config.init_from='{base.absolute()}', but this run's would hold every param"
          in str(error.value))

  # Without its base the run cannot resume, nor its checkpoint be read: one line naming it.
  base.rename(tmp_path / "moved")
  before = sorted(str(p) for p in workdir.rglob("*"))
  with pytest.raises(CheckpointError) as error:
    train.train(lora_config(corpus_file, base), str(workdir), print_fn=lambda *_: None,
                devices=ONE_DEVICE)
  message = str(error.value)
  assert "\n" not in message and f"{base} does not exist" in message
  assert "hold only the params config.finetune.trainable='lora' trains" in message
  assert sorted(str(p) for p in workdir.rglob("*")) == before
  with pytest.raises(CheckpointError, match=f"{base} does not exist"):
    rundir.load_run(workdir, step=1)


def test_a_resumed_lora_run_continues_bit_identically(lora_base, corpus_file, tmp_path):
  config = lora_config(corpus_file, lora_base)
  whole = train.Trainer(config, devices=ONE_DEVICE)
  checkpointer = checkpoint.Checkpointer(str(tmp_path), whole.config)
  try:
    for index in range(4):
      whole.step(index)
      if index == 1:
        whole.save(checkpointer, 2)
    checkpointer.wait()
    resumed = train.Trainer(config, devices=ONE_DEVICE, resuming=True)  # base from the source
    resumed.restore(checkpointer, 2)
  finally:
    checkpointer.close()
  for index in (2, 3):
    resumed.step(index)
  assert int(resumed.state.step) == 4
  expected, actual = flat(whole.state.params), flat(resumed.state.params)
  assert expected.keys() == actual.keys()
  for path, value in expected.items():
    np.testing.assert_array_equal(actual[path], value, err_msg=path)
  jax.tree.map(np.testing.assert_array_equal, flat(whole.state.opt_state),
               flat(resumed.state.opt_state))
  kernel = "['block_0']['attn']['query']['kernel']"
  np.testing.assert_array_equal(flat(rundir.load_run(lora_base)[2])[kernel], expected[kernel])
  assert np.any(expected["['block_0']['attn']['query']['lora_b']"])  # the adapters trained
