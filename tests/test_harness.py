"""The lm-evaluation-harness backend (bigflax.evaluation.harness) against lm_eval's own `hf`
backend: tiny random GPT-2 and Llama models saved with transformers, converted to bigflax run
directories, and three local tasks (multiple choice, rolling perplexity, generation)."""

import json
import os
import pathlib
import subprocess
import sys

# Everything is local: lm_eval's datasets come from JSON files the tests write.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from lm_eval import evaluator  # noqa: E402  (the test extra installs lm_eval: never skipped)

from bigflax import interop, rundir  # noqa: E402
from bigflax.config import base  # noqa: E402
from bigflax.data.tokenizers import ByteTokenizer  # noqa: E402
from bigflax.errors import DataError, UserError  # noqa: E402
from bigflax.evaluation import harness  # noqa: E402
from bigflax.model import ModelConfig, Transformer  # noqa: E402

from conftest import REPO, bigflax_env  # noqa: E402

BLOCK = 48
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers, "
         "stones and old trees; every morning they count the clouds and name the winds").split()


def sentence(rng, n: int) -> str:
  return " ".join(rng.choice(WORDS, n))


def write_tokenizer(directory: pathlib.Path, corpus: list[str], *, bos: bool) -> None:
  """A byte-level BPE trained on `corpus`, saved like any transformers tokenizer. bos=True adds
  <s> before every text (Llama's convention), else nothing is added (GPT-2's)."""
  import transformers
  specials = ["<s>", "</s>"] if bos else ["<|endoftext|>"]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  if bos:
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=specials[0], eos_token=specials[-1])
  wrapped.save_pretrained(directory)


def write_model(directory: pathlib.Path, family: str, vocab_size: int) -> None:
  import torch
  import transformers
  torch.manual_seed(0)
  if family == "gpt2":
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=BLOCK, n_embd=32,
                                     n_layer=2, n_head=2, initializer_range=0.2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
  else:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=BLOCK,
                                      initializer_range=0.2, tie_word_embeddings=False,
                                      bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(directory)


def to_run(hf_dir: pathlib.Path, workdir: pathlib.Path) -> None:
  """A bigflax run directory of the transformers model, reading its tokenizer."""
  fields, params = interop.load_hf(hf_dir)
  config = base()
  config.model.update(fields)
  config.data.tokenizer = "hf"
  config.data.tokenizer_model = str(hf_dir)
  workdir.mkdir()
  rundir.write_config(config, workdir)
  rundir.export_params(workdir, params)


def write_tasks(directory: pathlib.Path, rng) -> None:
  """Three tasks over local JSON-lines files: 16 multiple-choice questions (answers of like
  length, so a random model gets some right), 5 documents for rolling perplexity (two longer
  than the context) and 6 prompts to continue by up to 40 tokens (more than one
  GENERATION_CHUNK; the longer prompts left-truncated to the 8 that leaves) until 'o' (in many
  tokens) or 'ee' (across tokens too); and a task whose dataset is on the Hugging Face Hub
  only."""
  directory.mkdir()
  choice = [{"question": sentence(rng, 6), "choices": [sentence(rng, 2) for _ in range(4)],
             "answer": int(rng.integers(4))} for _ in range(16)]
  documents = [{"text": sentence(rng, n)} for n in (5, 12, 30, 70, 120)]
  prompts = [{"prompt": sentence(rng, n), "target": "the"} for n in (2, 4, 6, 8, 10, 30)]
  common = "test_split: test\nnum_fewshot: 0\n"
  tasks = {
      "tiny_choice": (choice, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                      "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
      "tiny_perplexity": (documents, "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                          "doc_to_target: '{{text}}'\nmetric_list:\n"
                          "  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
      "tiny_generate": (prompts, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                        "doc_to_target: '{{target}}'\ngeneration_kwargs:\n"
                        "  until: ['o', 'ee']\n  max_gen_toks: 40\n  do_sample: false\n"
                        "metric_list:\n  - metric: exact_match\n"),
  }
  for name, (rows, spec) in tasks.items():
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\n{common}{spec}")
  (directory / "hub_only.yaml").write_text(
      "task: hub_only\ndataset_path: bigflax-tests/not-in-any-cache\ntest_split: test\n"
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """{family: (transformers directory, bigflax run directory)} and the tasks directory."""
  root = tmp_path_factory.mktemp("harness")
  rng = np.random.default_rng(0)
  corpus = [sentence(rng, 20) for _ in range(200)]
  runs = {}
  for family, bos in (("gpt2", False), ("llama", True)):
    hf_dir = root / f"hf_{family}"
    write_tokenizer(hf_dir, corpus, bos=bos)
    vocab = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size()
    write_model(hf_dir, family, vocab)
    to_run(hf_dir, root / f"run_{family}")
    runs[family] = (hf_dir, root / f"run_{family}")
  write_tasks(root / "tasks", rng)
  return runs, root / "tasks"


TASKS = ["tiny_choice", "tiny_perplexity", "tiny_generate"]


def evaluate(lm, tasks_dir):
  return evaluator.simple_evaluate(model=lm, tasks=TASKS,
                                   task_manager=harness.task_manager(str(tasks_dir)),
                                   log_samples=True, bootstrap_iters=0)


def responses(results, task):
  """Each request's raw response, in document order."""
  return [resp for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
          for resp in sample["resps"]]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_the_hf_backend(setup, family):
  from lm_eval.models.huggingface import HFLM
  runs, tasks_dir = setup
  hf_dir, workdir = runs[family]
  ours = evaluate(harness.BigflaxLM(workdir=str(workdir), batch_size=4), tasks_dir)
  reference = evaluate(HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4), tasks_dir)

  mine, theirs = _flat(responses(ours, "tiny_choice")), _flat(responses(reference, "tiny_choice"))
  assert len(mine) == len(theirs) == 64
  np.testing.assert_allclose([r[0] for r in mine], [r[0] for r in theirs], rtol=0, atol=1e-4)
  # Per-token log-probabilities differ between torch and XLA in float32's last digits; over a
  # document's 120 tokens they add up to ~1e-4 on totals near 1,000: allow 2 ulp of the total.
  mine, theirs = responses(ours, "tiny_perplexity"), responses(reference, "tiny_perplexity")
  assert len(mine) == len(theirs) == 5
  np.testing.assert_allclose(_flat(mine), _flat(theirs), rtol=2.4e-7, atol=1e-4)
  is_greedy = [r[1] for r in _flat(responses(ours, "tiny_choice"))]
  assert is_greedy == [r[1] for r in _flat(responses(reference, "tiny_choice"))]
  generated = _flat(responses(ours, "tiny_generate"))
  assert generated == _flat(responses(reference, "tiny_generate"))
  assert any(generated), "the tiny models generate nothing: the comparison would be empty"
  for task, metric in (("tiny_choice", "acc,none"), ("tiny_choice", "acc_norm,none"),
                       ("tiny_generate", "exact_match,none")):
    assert ours["results"][task][metric] == reference["results"][task][metric]
  np.testing.assert_allclose(ours["results"]["tiny_perplexity"]["bits_per_byte,none"],
                             reference["results"]["tiny_perplexity"]["bits_per_byte,none"],
                             rtol=1e-5)

  # run_tasks (what `bigflax eval --tasks` calls) reports the same numbers.
  _, model, params, tokenizer = rundir.load_run(workdir)
  table = harness.run_tasks(model, params, tokenizer, ["tiny_choice"], batch_size=2,
                            include_path=str(tasks_dir))
  assert table["tiny_choice"]["acc"] == reference["results"]["tiny_choice"]["acc,none"]


def _flat(values):
  """lm_eval's responses: (logprob, is_greedy) tuples, floats or strings, possibly in lists."""
  out = []
  for v in values:
    out.extend(_flat(v) if isinstance(v, list) else [v])
  return out


def test_pack_fills_rows_best_fit_decreasing():
  lengths = [3, 5, 2, 8, 1, 4, 6]
  placements = harness.pack(lengths, 8)
  rows = {}
  for length, p in zip(lengths, placements):
    assert p.length == length
    rows.setdefault(p.row, []).append((p.start, p.start + length))
  for spans in rows.values():  # disjoint, inside the row
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 8
  assert len(rows) == 4  # 29 tokens: 8 | 6 + 2 | 5 + 3 | 4 + 1 (best fit)
  assert [placements[i].row for i in (3, 6, 2)] == [0, 1, 1]


def test_packed_scores_equal_each_request_alone():
  """Requests packed several to a row (and one longer than the context, left-truncated) score
  what each scores alone in its own forward pass."""
  cfg = ModelConfig(vocab_size=256, block_size=16, num_layers=2, num_heads=2, embed_dim=32)
  model = Transformer(cfg)
  params = model.init(jax.random.key(0), np.zeros((1, 16), np.int32))["params"]
  lm = harness.BigflaxLM.of(model, params, ByteTokenizer(), batch_size=2)
  rng = np.random.default_rng(0)
  requests = [(None, list(rng.integers(0, 256, c)), list(rng.integers(0, 256, n)))
              for c, n in ((3, 2), (1, 1), (6, 4), (2, 3), (20, 3), (4, 1), (9, 5))]
  calls, score = [], lm._score
  lm._score = lambda *args: calls.append(1) or score(*args)
  scores = lm._loglikelihood_tokens(requests)
  alone = jax.jit(model.apply)  # one sequence, right-padded: causal, so padding changes nothing
  for (_, context, continuation), (logprob, greedy) in zip(requests, scores):
    whole = (context + continuation)[-(cfg.block_size + 1):]
    tokens = np.zeros((1, cfg.block_size), np.int32)
    tokens[0, :len(whole) - 1] = whole[:-1]
    logprobs = np.asarray(jax.nn.log_softmax(alone({"params": params}, tokens)[0]))
    rows = np.arange(len(whole) - 1)[-len(continuation):]
    targets = np.asarray(whole[1:])[-len(continuation):]
    np.testing.assert_allclose(logprob, logprobs[rows, targets].sum(), rtol=1e-5)
    assert greedy == bool((logprobs[rows].argmax(-1) == targets).all())
  # 51 tokens in 4 rows of 16 (16 | 13 + 1 | 9 + 4 | 4 + 4): two forward passes of 2 rows.
  assert len(calls) == 2


@pytest.mark.slow
def test_bad_task_names_and_unreachable_datasets(setup):
  runs, tasks_dir = setup
  _, model, params, tokenizer = rundir.load_run(runs["gpt2"][1])
  with pytest.raises(UserError, match="no task 'tiny_choise'; did you mean tiny_choice"):
    harness.run_tasks(model, params, tokenizer, ["tiny_choise"], include_path=str(tasks_dir))
  with pytest.raises(DataError, match="bigflax-tests/not-in-any-cache.*HF_DATASETS_OFFLINE=1"):
    harness.run_tasks(model, params, tokenizer, ["hub_only"], include_path=str(tasks_dir))


@pytest.mark.slow
def test_lm_eval_command_line(setup):
  """`python -m bigflax.evaluation.harness` is lm_eval's CLI with --model bigflax known."""
  runs, tasks_dir = setup
  result = subprocess.run(
      [sys.executable, "-m", "bigflax.evaluation.harness", "--model", "bigflax", "--model_args",
       f"workdir={runs['llama'][1]},batch_size=4", "--tasks", "tiny_choice", "--include_path",
       str(tasks_dir), "--limit", "4"],
      cwd=REPO, env=bigflax_env(), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tiny_choice" in result.stdout and "acc" in result.stdout


@pytest.mark.slow
def test_params_sharded_over_a_mesh_score_the_same(setup):
  """FSDP-sharded params on a 2 × 4 mesh (rows split over 8 devices) give the numbers the
  params on one device give, on all three kinds of request."""
  from bigflax import run as run_lib
  runs, tasks_dir = setup
  config, model, params, tokenizer = rundir.load_run(runs["gpt2"][1])
  config.mesh.data, config.mesh.fsdp, config.batch_size = 2, 4, 8
  built = run_lib.build(config)
  sharded = jax.device_put(params, built.state_shardings.params)
  assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
  lm = harness.BigflaxLM.of(built.model, sharded, tokenizer, batch_size=3,
                            batch_sharding=built.batch_sharding, rules=built.rules)
  assert lm.batch_size == 8  # rows rounded up to whole rows per data shard
  spread = evaluate(lm, tasks_dir)
  alone = evaluate(harness.BigflaxLM.of(model, params, tokenizer, batch_size=8), tasks_dir)
  for task in ("tiny_choice", "tiny_perplexity"):
    a, b = _flat(responses(spread, task)), _flat(responses(alone, task))
    np.testing.assert_allclose([x[0] if isinstance(x, tuple) else x for x in a],
                               [x[0] if isinstance(x, tuple) else x for x in b], rtol=1e-6)
  assert _flat(responses(spread, "tiny_generate")) == _flat(responses(alone, "tiny_generate"))


SPMD_SCRIPT = r"""
import json, sys
import jax
address, process_id, workdir, tasks_dir, out = sys.argv[1:]
if int(process_id) >= 0:
  jax.distributed.initialize(address, 2, int(process_id))
from lm_eval import evaluator
from bigflax import data, rundir, run
from bigflax.evaluation import harness
config = rundir.read_config(workdir)
config.mesh.data, config.mesh.fsdp, config.batch_size = 2, 2, 4
built = run.build(config)
params = rundir.read_params(workdir, built.abstract_state.params)
lm = harness.BigflaxLM.of(built.model, params, data.make_tokenizer(config.data), batch_size=4,
                          batch_sharding=built.batch_sharding, rules=built.rules)
results = evaluator.simple_evaluate(model=lm,
                                    tasks=["tiny_choice", "tiny_perplexity", "tiny_generate"],
                                    task_manager=harness.task_manager(tasks_dir),
                                    log_samples=True, bootstrap_iters=0)
with open(out, "w") as f:
  json.dump({task: [s["resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
             for task, samples in results["samples"].items()}, f)
"""


@pytest.mark.slow
def test_two_processes_score_like_one(setup, tmp_path):
  """Two processes of 2 devices each (data 2 × fsdp 2 over both) run the same requests and get
  what one device gets."""
  import portpicker
  runs, tasks_dir = setup
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-c", SPMD_SCRIPT, address, str(i), str(runs["gpt2"][1]), str(tasks_dir),
       str(tmp_path / f"{i}.json")], cwd=REPO, env=bigflax_env(devices),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i, devices in ((0, 2), (1, 2))]
  _, model, params, tokenizer = rundir.load_run(runs["gpt2"][1])
  alone = evaluate(harness.BigflaxLM.of(model, params, tokenizer, batch_size=4), tasks_dir)
  one = json.loads(json.dumps({task: responses(alone, task) for task in TASKS}))
  for process in processes:
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
  two = [json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1)]
  assert two[0] == two[1]  # the same numbers on both processes, bit for bit
  for task in ("tiny_choice", "tiny_perplexity"):  # JSON: (logprob, is_greedy) became lists
    np.testing.assert_allclose(np.asarray(_flat(two[0][task]), float),
                               np.asarray(_flat(one[task]), float), rtol=1e-6)
  assert _flat(two[0]["tiny_generate"]) == _flat(one["tiny_generate"])
