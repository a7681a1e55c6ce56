"""Requests per second of bigflax's lm-evaluation-harness backend against lm_eval's own `hf`
backend (torch, CPU), on the same tiny model and multiple-choice task.

    python tools/bench_harness.py [--questions 200] [--rounds 5] [--batch_size 16]

Builds a random GPT-2 with transformers (and a byte-level BPE tokenizer), converts it to a bigflax
run directory, writes a local multiple-choice task (4 choices per question: 4 loglikelihood
requests each), and times `loglikelihood` on the task's requests with each backend in turn,
alternating rounds so both see the same machine load. The first call of each is a warm-up
(bigflax compiles its forward pass there) and is reported apart. --batch_size is rows of
block_size tokens packed with several requests for bigflax, and requests (padded to the longest)
for hf. Needs the test extra (torch, transformers, lm_eval[hf]).
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import test_harness as fixtures  # noqa: E402  (the parity test's tiny models and tasks)

from bigflax.evaluation import harness  # noqa: E402


def write_task(directory: pathlib.Path, questions: int, rng) -> None:
  directory.mkdir()
  rows = [{"question": fixtures.sentence(rng, 12),
           "choices": [fixtures.sentence(rng, int(rng.integers(2, 6))) for _ in range(4)],
           "answer": int(rng.integers(4))} for _ in range(questions)]
  data = directory / "bench_choice.jsonl"
  data.write_text("".join(json.dumps(row) + "\n" for row in rows))
  (directory / "bench_choice.yaml").write_text(
      f"task: bench_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {data}\ntest_split: test\nnum_fewshot: 0\noutput_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
      "metric_list:\n  - metric: acc\n")


def timed(lm, requests) -> tuple[float, list]:
  start = time.perf_counter()
  results = lm.loglikelihood(requests, disable_tqdm=True)
  return time.perf_counter() - start, results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--questions", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="bench-harness-") as root:
    bench(args, pathlib.Path(root))


def bench(args, root: pathlib.Path) -> None:
  from lm_eval.models.huggingface import HFLM
  rng = np.random.default_rng(0)
  hf_dir = root / "hf"
  fixtures.write_tokenizer(hf_dir, [fixtures.sentence(rng, 20) for _ in range(200)],
                           bos=args.family == "llama")
  import tokenizers
  vocab = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json")).get_vocab_size()
  fixtures.write_model(hf_dir, args.family, vocab)
  fixtures.to_run(hf_dir, root / "run")
  write_task(root / "tasks", args.questions, rng)
  task = harness.task_manager(str(root / "tasks")).load(["bench_choice"])["tasks"]["bench_choice"]
  task.build_all_requests(rank=0, world_size=1)
  requests = task.instances
  tokens = sum(len(r.args[0]) + len(r.args[1]) for r in requests)

  backends = {"bigflax": harness.BigflaxLM(workdir=str(root / "run"),
                                           batch_size=args.batch_size),
              "hf": HFLM(pretrained=str(hf_dir), device="cpu", batch_size=args.batch_size)}
  print(f"{len(requests)} loglikelihood requests ({args.questions} questions x 4 choices, "
        f"{tokens / len(requests):.0f} characters each on average), {args.family} "
        f"block_size {fixtures.BLOCK}, batch_size {args.batch_size}")
  times = {name: [] for name in backends}
  answers = {}
  for name, lm in backends.items():
    warmup, answers[name] = timed(lm, requests)
    print(f"  {name:8} warm-up call {warmup:.2f}s")
  gap = max(abs(a[0] - b[0]) for a, b in zip(answers["bigflax"], answers["hf"]))
  print(f"  largest |loglikelihood difference| between the backends: {gap:.2e}")
  for round_number in range(args.rounds):
    line = []
    for name, lm in backends.items():
      seconds, _ = timed(lm, requests)
      times[name].append(seconds)
      line.append(f"{name} {len(requests) / seconds:7.0f} req/s")
    print(f"  round {round_number + 1}: " + ", ".join(line))
  rates = {name: len(requests) / statistics.median(t) for name, t in times.items()}
  print(f"median: bigflax {rates['bigflax']:.0f} req/s, hf {rates['hf']:.0f} req/s, "
        f"ratio bigflax/hf {rates['bigflax'] / rates['hf']:.2f}x")


if __name__ == "__main__":
  main()
