"""EleutherAI's lm-evaluation-harness on bigflax models: an `lm_eval` LM registered as "bigflax".

    pip install "bigflax[eval]"
    python -m bigflax.evaluation.harness --model bigflax --model_args workdir=D,batch_size=16 \
        --tasks hellaswag,lambada_openai

lm_eval 0.4 finds models only in its own registry (no plugin entry points), so the command above
is lm_eval's own CLI with the bigflax model registered first (`main`); every lm_eval flag works.
`run_tasks` is the same from Python (`bigflax eval --tasks` and in-loop evaluation call it).
lm_eval is imported on first use: bigflax itself imports without the extra.

How the requests run:
- loglikelihood: each (context, continuation) becomes one sequence (left-truncated to
  block_size + 1 tokens, as the hf backend does); the sequences, longest first, are packed into
  rows of block_size tokens with segment ids and positions restarting per sequence, so one
  forward pass scores many requests and none sees another (attention stays in its segment).
- loglikelihood_rolling: a document longer than the context is cut into lm_eval's rolling
  windows (each token predicted once, with as much context as fits); the windows of all
  documents are packed and scored like the above, and summed per document.
- generate_until: bigflax.decode's KV-cache sampler (greedy unless do_sample), batched, with the
  context left-truncated to leave room for max_gen_toks; a row ends at EOS or once its text holds
  one of the `until` strings (checked every GENERATION_CHUNK ids), and is cut at the first.

Tokens follow the hf backend's conventions, so a converted Hugging Face model scores what
lm_eval's `hf` backend scores: text is encoded the way the run's tokenizer encodes a document's
start (BOS when its documents get one), and an empty context or a rolling window starts from BOS
(else EOS; the byte and char tokenizers have neither, there a newline stands in).

On several processes every process runs the same requests in the same order (the jitted forward
passes are collective); the results are the same on all, and the caller writes them once.
"""

import bisect
import contextlib
import dataclasses
import difflib
import functools
import math
import re
import sys

import types

import jax
import jax.numpy as jnp
import numpy as np

from bigflax import decode, rundir, sharding
from bigflax.errors import DataError, UserError, first_line

DEFAULT_BATCH_SIZE = 8  # rows of block_size tokens per forward pass (and prompts per generation)
MAX_GEN_TOKS = 256  # lm_eval's default when a task sets no max_gen_toks
GENERATION_CHUNK = 32  # ids generated between checks for stop strings


@functools.cache
def _lm_eval() -> types.SimpleNamespace:
  """The parts of lm_eval this backend uses, imported on first use (lm_eval is the optional
  `eval` extra: bigflax imports without it), or a UserError saying how to install it."""
  try:
    import datasets  # noqa: PLC0415 - lm_eval's dependency, for its fetch errors
    from lm_eval import evaluator, utils  # noqa: PLC0415
    from lm_eval.api.model import TemplateLM  # noqa: PLC0415
    from lm_eval.api.registry import register_model  # noqa: PLC0415
    from lm_eval.models import utils as model_utils  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415
  except ImportError as e:
    raise UserError(f"lm-evaluation-harness tasks need lm_eval ({e}); install it with "
                    "pip install 'bigflax[eval]'") from None
  return types.SimpleNamespace(datasets=datasets, evaluator=evaluator, utils=utils,
                               TemplateLM=TemplateLM, register_model=register_model,
                               model_utils=model_utils, TaskManager=TaskManager)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a sequence went in the packed rows: row, first column, length."""
  row: int
  start: int
  length: int


def pack(lengths: list[int], row_length: int) -> list[Placement]:
  """Places sequences of `lengths` (each ≤ row_length) into as few rows as best-fit decreasing
  finds: longest first, each into the row with the least room that still holds it."""
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rooms, placements, used = [], [None] * len(lengths), []  # rooms: sorted (free, row)
  for i in order:
    k = bisect.bisect_left(rooms, (lengths[i], -1))
    if k == len(rooms):
      row = len(used)
      used.append(0)
    else:
      _, row = rooms.pop(k)
    placements[i] = Placement(row, used[row], lengths[i])
    used[row] += lengths[i]
    if used[row] < row_length:
      bisect.insort(rooms, (row_length - used[row], row))
  return placements


def _score(params, tokens, targets, positions, segment_ids, *, model, vocab_size: int):
  """Per-token log p(target) and whether the target is the argmax, [rows, length] each. Ids past
  the tokenizer's vocabulary (the model's padding) are never predicted."""
  logits = model.apply({"params": params}, tokens, positions, segment_ids)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits.astype(jnp.float32),
                     -jnp.inf)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets


def _encoded(tokenizer, text: str) -> list[int]:
  """`text`'s ids, or none where the tokenizer cannot encode it (a char tokenizer's corpus may
  lack the character)."""
  try:
    return [int(i) for i in tokenizer.encode(text)]
  except DataError:
    return []


def _document_marks(tokenizer) -> tuple[list[int], list[int]]:
  """(ids before, ids after) the text in the tokenizer's encoding of a document: BOS and EOS
  where the tokenizer wraps documents in them, else empty (byte and char tokenizers)."""
  probe = tokenizer.decode([tokenizer.vocab_size - 1]) or "a"
  plain = _encoded(tokenizer, probe)
  if not plain:
    return [], []
  whole = [int(i) for i in tokenizer.encode_document(probe.encode("utf-8"), "a probe")]
  start = next(i for i in range(len(whole)) if whole[i:i + len(plain)] == plain)
  return whole[:start], whole[start + len(plain):]


class BigflaxRequests:
  """What BigflaxLM (lm_class(): this on lm_eval's TemplateLM, registered as "bigflax") does with
  lm_eval's requests: a bigflax model as an lm_eval LM. From the command line: model_args
  workdir=D (a run directory: its params/ export, or checkpoint `step`), batch_size=B (rows per
  forward pass), seed=S (sampling). From Python: BigflaxLM.of(model, params, tokenizer, ...)."""

  def __init__(self, workdir: str | None = None, step: int | None = None,
               batch_size: int | str | None = None, seed: int = 0, **unused):
    # lm_eval passes device and max_batch_size to every model; JAX places arrays itself.
    del unused
    super().__init__()
    if workdir is None:
      raise UserError("the bigflax model needs the run directory: --model_args workdir=DIR "
                      "(optionally ,step=N for a checkpoint)")
    _, model, params, tokenizer = rundir.load_run(workdir, None if step is None else int(step))
    self._setup(model, params, tokenizer, batch_size=batch_size, seed=int(seed))

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(_lm_eval().utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    # --model_args win over lm_eval's own flags: its CLI always passes --batch_size (default 1).
    given = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**given, **arg_dict})

  @classmethod
  def of(cls, model, params, tokenizer, *, batch_size: int | str | None = None, mesh=None,
         batch_sharding=None, rules=(), seed: int = 0) -> "BigflaxLM":
    """The LM of a model in memory. With `batch_sharding` (a NamedSharding of [batch, length]
    arrays on the params' mesh) the rows are split over the mesh like a training batch, the
    forward pass traced with the logical-axis `rules` active."""
    lm = cls.__new__(cls)  # no run directory to read: the fields come from the arguments
    super(BigflaxRequests, lm).__init__()  # TemplateLM's
    lm._setup(model, params, tokenizer, batch_size=batch_size, mesh=mesh,
              batch_sharding=batch_sharding, rules=rules, seed=seed)
    return lm

  def _setup(self, model, params, tokenizer, *, batch_size, seed: int, mesh=None,
             batch_sharding=None, rules=()):
    if model.cfg.num_labels or not model.cfg.causal:
      raise UserError("lm-evaluation-harness tasks need a causal language model; this one "
                      f"{'is a classifier' if model.cfg.num_labels else 'is an encoder'}: "
                      "evaluate a run trained for next-token prediction")
    if model.cfg.vocab_size < tokenizer.vocab_size:
      raise UserError(f"the model has {model.cfg.vocab_size} ids but its tokenizer "
                      f"{tokenizer.vocab_size}; give the run its own tokenizer (config.json's "
                      "data section)")
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.block_size = model.cfg.block_size
    self.seed = seed
    # "auto" (lm_eval's search for the largest batch that fits) is not done: the default.
    given = None if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
    self.rows = given or DEFAULT_BATCH_SIZE
    self.mesh = mesh if mesh is not None else getattr(batch_sharding, "mesh", None)
    self.rules = rules
    self.batch_sharding = batch_sharding
    if batch_sharding is not None:  # whole rows per data shard
      axes = batch_sharding.spec[0] if batch_sharding.spec else None
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      shards = math.prod(batch_sharding.mesh.shape[a] for a in axes)
      self.rows = -(-self.rows // shards) * shards
    before, after = _document_marks(tokenizer)
    self._document_start = before
    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    self._eos = eos if eos is not None else (after[0] if after else None)
    bos = bos if bos is not None else (before[0] if before else None)
    newline = _encoded(tokenizer, "\n")
    self._prefix = next(i for i in (bos, self._eos, (newline or [0])[-1]) if i is not None)
    # Replicated results: every process reads all of them.
    replicated = None if self.mesh is None else sharding.replicated(self.mesh)
    self._score = jax.jit(functools.partial(_score, model=model, vocab_size=tokenizer.vocab_size),
                          out_shardings=replicated)

  # ---- what lm_eval asks of a model ------------------------------------------------------------

  @property
  def eot_token_id(self):
    return self._eos

  @property
  def prefix_token_id(self):
    return self._prefix

  @property
  def max_length(self) -> int:
    return self.block_size

  @property
  def batch_size(self) -> int:
    return self.rows

  @property
  def tokenizer_name(self) -> str:
    return type(self.tokenizer).__name__

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del kwargs
    ids = [int(i) for i in self.tokenizer.encode(string)]
    return ids if add_special_tokens is False else self._document_start + ids

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    sequences, scored = [], []
    for _, context, continuation in requests:
      if not 0 < len(continuation) <= self.block_size:
        raise UserError(f"a continuation of {len(continuation)} tokens cannot be scored by a "
                        f"model of block_size {self.block_size}; shorten the task's answers")
      whole = (list(context) + list(continuation))[-(self.block_size + 1):]
      sequences.append(whole)
      scored.append(len(continuation))
    placements = pack([len(s) - 1 for s in sequences], self.block_size)
    num_rows = max((p.row for p in placements), default=-1) + 1
    by_row = [[] for _ in range(num_rows)]
    for i, p in enumerate(placements):
      by_row[p.row].append(i)
    results = [None] * len(sequences)
    for first in range(0, num_rows, self.rows):
      rows = by_row[first:first + self.rows]
      fields = np.zeros((4, self.rows, self.block_size), np.int32)
      tokens, targets, positions, segment_ids = fields
      for r, members in enumerate(rows):
        for segment, i in enumerate(members, start=1):
          p, seq = placements[i], sequences[i]
          span = slice(p.start, p.start + p.length)
          tokens[r, span], targets[r, span] = seq[:-1], seq[1:]
          positions[r, span], segment_ids[r, span] = np.arange(p.length), segment
      logprobs, greedy = self._forward(tokens, targets, positions, segment_ids)
      for r, members in enumerate(rows):
        for i in members:
          p = placements[i]
          span = slice(p.start + p.length - scored[i], p.start + p.length)
          results[i] = (float(np.sum(logprobs[r, span], dtype=np.float64)),
                        bool(greedy[r, span].all()))
    for (key, _, _), answer in zip(requests, results):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
    return results

  def _forward(self, *fields):
    """The jitted scoring of one batch of packed rows, on the mesh when there is one."""
    if self.batch_sharding is not None:  # every process holds all rows: it takes its own
      fields = [jax.make_array_from_callback(f.shape, self.batch_sharding,
                                             lambda index, f=f: f[index]) for f in fields]
    with self._activated():
      return [np.asarray(o) for o in self._score(self.params, *fields)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    windows, owners = [], []
    for number, (text,) in enumerate(request.args for request in requests):
      for window in _lm_eval().utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.block_size, context_len=1):
        windows.append((None, *_lm_eval().utils.make_disjoint_window(window)))
        owners.append(number)
    totals = np.zeros(len(requests), np.float64)
    for number, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
      totals[number] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
    return [float(t) for t in totals]

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    results = [None] * len(requests)
    groups = {}  # requests with the same generation settings run together
    for number, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(number)
    eos_text = None if self._eos is None else self.tokenizer.decode([self._eos])
    helpers = _lm_eval().model_utils
    for numbers in groups.values():
      kwargs = helpers.normalize_gen_kwargs(dict(requests[numbers[0]].args[1]), MAX_GEN_TOKS)
      until = helpers.handle_stop_sequences(kwargs.pop("until", None), eos=eos_text or None)
      max_gen = int(kwargs.pop("max_gen_toks"))
      if max_gen >= self.block_size:
        raise UserError(f"the task asks for max_gen_toks={max_gen}, which leaves no room for a "
                        f"context in block_size {self.block_size}; lower it with lm_eval's "
                        "--gen_kwargs max_gen_toks=N")
      sample = kwargs.get("do_sample", False) and kwargs.get("temperature", 1.0) > 0
      settings = dict(temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                      top_k=int(kwargs.get("top_k") or 0),
                      top_p=float(kwargs.get("top_p") or 1.0))
      # Longest first, like the hf backend: a batch's rows then share similar lengths.
      numbers = sorted(numbers, key=lambda n: -len(requests[n].args[0]))
      for first in range(0, len(numbers), self.rows):
        chunk = numbers[first:first + self.rows]
        prompts = [self.tok_encode(requests[n].args[0])[-(self.block_size - max_gen):] or
                   [self.prefix_token_id] for n in chunk]
        rng = jax.random.fold_in(jax.random.key(self.seed), first)
        for n, ids in zip(chunk, self._generate(prompts, max_gen, until, settings, rng)):
          text = helpers.postprocess_generated_text(self.tokenizer.decode(ids), until, None)
          results[n] = text
          self.cache_hook.add_partial("generate_until", requests[n].args, text)
    return results

  def _generate(self, prompts, max_gen: int, until: list[str], settings: dict, rng):
    """Each prompt's continuation (ids) of up to max_gen ids, ending at EOS (left out) or once
    its text holds a stop string. Generates GENERATION_CHUNK ids at a time so rows stop soon
    after a stop string, which a stop id could not tell: the string may span ids, or sit inside
    one after text that belongs to the answer."""
    new = [[] for _ in prompts]
    live = list(range(len(prompts)))
    while live:
      budget = min(GENERATION_CHUNK, max_gen - len(new[live[0]]))
      rows = [prompts[i] + new[i] for i in live]
      # Full batches only: one compiled sampler whatever the number of rows left.
      rows += [rows[0]] * (self.rows - len(rows))
      with self._activated(split_rows=False):
        outputs = decode.generate(
            self.model, self.params, rows, max_new_tokens=budget,
            rng=jax.random.fold_in(rng, len(new[live[0]])),
            stop_tokens=() if self._eos is None else (self._eos,),
            vocab_size=self.tokenizer.vocab_size, **settings)
      still = []
      for i, ids in zip(live, outputs):
        new[i] += ids.tolist()
        text = self.tokenizer.decode(new[i])
        if len(ids) == budget and len(new[i]) < max_gen and not any(s in text for s in until):
          still.append(i)
      live = still
    return new

  def _activated(self, split_rows: bool = True):
    """The mesh and logical-axis rules the model is traced with. split_rows=False keeps every
    row on every device (the params stay sharded): decode.generate reads its tokens back as one
    host array, which rows spread over several processes would not allow."""
    if self.mesh is None:
      return contextlib.nullcontext()
    rules = self.rules if split_rows else tuple(
        (name, None if name == "batch" else axes) for name, axes in self.rules)
    return sharding.activate(self.mesh, rules)


@functools.cache
def lm_class() -> type:
  """BigflaxLM: BigflaxRequests on lm_eval's TemplateLM, registered as lm_eval's "bigflax"
  model (built once, on first use)."""
  lm_eval = _lm_eval()
  return lm_eval.register_model("bigflax")(
      type("BigflaxLM", (BigflaxRequests, lm_eval.TemplateLM),
           {"__doc__": BigflaxRequests.__doc__}))


def __getattr__(name: str):
  if name == "BigflaxLM":  # harness.BigflaxLM, built when first asked for
    return lm_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_tasks(tasks: list[str], task_manager) -> None:
  """A UserError naming the first task lm_eval does not know, with its closest names."""
  known = task_manager.all_tasks
  for name in tasks:
    if name not in known:
      close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
      hint = (f"did you mean {', '.join(close)}?" if close
              else "`python -m bigflax.evaluation.harness ls tasks` lists them")
      raise UserError(f"lm-evaluation-harness has no task {name!r}; {hint}")


def metrics_of(results: dict) -> dict[str, dict[str, float]]:
  """simple_evaluate's results → {task: {metric: value}}; `acc,none` (no filter) becomes `acc`,
  other filters keep their name (`exact_match,strict-match`)."""
  table = {}
  for task, values in results["results"].items():
    table[task] = {key.removesuffix(",none"): float(value) for key, value in values.items()
                   if isinstance(value, int | float) and key != "sample_len"}
  return table


@functools.cache
def task_manager(include_path: str | None = None):
  """lm_eval's index of its tasks (and those under `include_path`): built once per process, as
  it reads thousands of YAML files (half a minute on a small machine)."""
  return _lm_eval().TaskManager(include_path=include_path)


def run_tasks(model, params, tokenizer, tasks: list[str], *, batch_size: int | None = None,
              limit: int | float | None = None, mesh=None, batch_sharding=None, rules=(),
              include_path: str | None = None, num_fewshot: int | None = None,
              seed: int = 0) -> dict[str, dict[str, float]]:
  """Runs lm-evaluation-harness `tasks` on a model in memory; {task: {metric: value}}.

  `limit` caps the documents per task (a fraction for < 1); `include_path` is a directory of
  task YAML files besides lm_eval's own. Params sharded over a mesh: pass the run's
  batch_sharding (and logical-axis rules); every process must call this with the same arguments
  and gets the same numbers. Unknown task names and datasets that cannot be fetched are
  UserErrors."""
  manager = task_manager(include_path)
  check_tasks(tasks, manager)
  lm = lm_class().of(model, params, tokenizer, batch_size=batch_size, mesh=mesh,
                     batch_sharding=batch_sharding, rules=rules, seed=seed)
  lm_eval = _lm_eval()
  try:
    results = lm_eval.evaluator.simple_evaluate(
        model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot, task_manager=manager,
        log_samples=False, torch_random_seed=None, bootstrap_iters=0)
  except (ConnectionError, lm_eval.datasets.exceptions.DatasetNotFoundError) as e:
    raise unfetched_error(tasks, e) from None
  return metrics_of(results)


def unfetched_error(tasks: list[str], error: Exception) -> DataError:
  """A task's dataset is neither in the Hugging Face datasets cache nor reachable: say which and
  how to bring it here."""
  named = re.search(r"'([^']+)'", first_line(error))
  dataset = named.group(1) if named else "NAME"
  return DataError(
      f"the dataset of lm-evaluation-harness task(s) {', '.join(tasks)} could not be fetched "
      f"({first_line(error)}); on a machine with network run python -c \"import datasets; "
      f"datasets.load_dataset('{dataset}')\" (or the same tasks), copy its Hugging Face cache "
      "(HF_HOME, default ~/.cache/huggingface) here and set HF_DATASETS_OFFLINE=1")


def main(argv: list[str] | None = None) -> None:
  """lm_eval's command line, with the "bigflax" model registered."""
  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  try:
    lm_class()
    from lm_eval.__main__ import cli_evaluate  # noqa: PLC0415 - the optional extra
    cli_evaluate()
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
