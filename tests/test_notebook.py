"""notebooks/quickstart.ipynb: its jupytext pair is in sync, and it runs top to bottom on a CPU.

The slow test executes the notebook in a kernel (nbclient) as a Colab user would, with the
`parameters` cell followed by fewer steps (papermill's convention) and the `network` cell (the
GPT-2 download) replaced by a tiny random GPT-2 and byte-level BPE written to the same directory,
so nothing is downloaded."""

import inspect
import json
import math
import pathlib

import jupytext
import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"
PAIRED = NOTEBOOKS / "quickstart.py"
STEPS = "PRETRAIN_STEPS = 20\nFINETUNE_STEPS = 40\n"


def test_the_notebook_and_its_percent_script_hold_the_same_cells():
  notebook, script = jupytext.read(NOTEBOOK), jupytext.read(PAIRED)
  assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in notebook.cells] == [
      (c.cell_type, c.source, c.metadata.get("tags")) for c in script.cells], (
      "the pair differs: run `jupytext --sync notebooks/quickstart.ipynb`")
  assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
  saved = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in saved.cells), "commit the notebook without outputs"
  tags = [tag for c in notebook.cells for tag in c.metadata.get("tags", [])]
  assert tags.count("parameters") == 1 and tags.count("network") == 1


def tiny_gpt2(directory):
  """A random 2-layer GPT-2 and a byte-level BPE trained here, saved as transformers saves them
  (what snapshot_download leaves in the notebook's HF_DIR). Its context is longer than the 64
  tokens the notebook fine-tunes and evaluates with, as GPT-2's 1,024 are."""
  import tokenizers  # noqa: PLC0415 - runs in the notebook's kernel, from this source
  import transformers  # noqa: PLC0415
  text = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}.\n" for a in range(0, 100, 7)
          for b in range(0, 100, 11)] + ["The meaning of life is a question of some weight.\n"] * 20
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train_from_iterator(text, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
  transformers.set_seed(0)
  config = transformers.GPT2Config(
      vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)


def tagged(notebook, tag: str) -> int:
  [index] = [i for i, c in enumerate(notebook.cells) if tag in c.metadata.get("tags", [])]
  return index


def code_cells(notebook, text: str) -> list:
  return [c for c in notebook.cells if c.cell_type == "code" and text in c.source]


def text_of(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream"
                 and o.name == "stdout")


@pytest.mark.slow
def test_the_quickstart_runs_end_to_end_on_a_cpu(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells[tagged(notebook, "network")].source = (
      inspect.getsource(tiny_gpt2) + "\n\ntiny_gpt2(HF_DIR)\n")
  notebook.cells.insert(tagged(notebook, "parameters") + 1, nbformat.v4.new_code_cell(STEPS))
  # The kernel inherits this environment (conftest's: CPU, a throwaway TFDS directory, the
  # tests' compilation cache) and runs in tmp_path, where the notebook writes everything.
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()

  runs = tmp_path / "runs"
  records = [json.loads(line) for line in (runs / "stdlib_bytes" / "metrics.jsonl").open()]
  steps = [r["step"] for r in records if "loss" in r]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert steps[-1] == 20 and len(evals) >= 2 and evals[-1] < evals[0] < math.log(256) + 0.5
  [plot] = code_cells(notebook, "read_metrics")
  assert any("image/png" in o.get("data", {}) for o in plot.outputs)
  samples = [text_of(c) for c in code_cells(notebook, "decode.sample_text")]
  assert [s.split(" ")[0] for s in samples] == ["def", "The"]
  assert all(len(s.strip()) > len("The meaning of life is") for s in samples)
  assert (runs / "gpt2" / "tokenizer" / "tokenizer.json").is_file()

  base, tuned = (json.loads((runs / name / "eval_final.json").read_text())["sets"]["answers"]
                 for name in ("gpt2", "gpt2_sft_merged"))
  # 40 LoRA steps on a random 2-layer model: 6.75 → 6.59 bits per byte, accuracy 0 → 0.06
  assert tuned["bpb"] < base["bpb"] - 0.1 and tuned["accuracy"] > base["accuracy"], (base, tuned)
  [scores] = code_cells(notebook, "evaluate_workdir")
  assert f"fine-tuned: {tuned['bpb']:.3f} bits per byte" in text_of(scores)
