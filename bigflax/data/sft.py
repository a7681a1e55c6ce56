"""Supervised fine-tuning examples (`config.data.source=sft`): the loss counts the answers only.

`config.data.path` is a JSON-lines file (or glob; `examples` says how files are read and split),
each line one example:

  {"prompt": "...", "completion": "..."}            one exchange
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

An example becomes tokens and a loss weight per token (1 on the completion's tokens, or the
assistant turns'; 0 on everything else), which packing carries into the rows' `loss_mask`: the
prompt is context the model reads, never a target it is trained to produce.

The text an example becomes:

  * with a tokenizer that has a chat template (a Hugging Face tokenizer_config.json's
    `chat_template`), the conversation rendered through it as transformers' apply_chat_template
    renders it (jinja2 with `messages`, `bos_token`, `eos_token`, `add_generation_prompt`), and
    tokenized as it does, without adding special tokens (the template writes its own); a
    prompt/completion is the conversation [user: prompt, assistant: completion];
  * else a prompt/completion is the prompt followed by the completion, as written, and messages
    are rendered through DEFAULT_CHAT_TEMPLATE, each message as

        <|ROLE|>\\nCONTENT<|end|>\\n

    (the generation prompt being `<|assistant|>\\n`); both are tokenized as a document, so a
    tokenizer that marks documents with BOS/EOS marks these too, and one that names an EOS
    (`eos_id`, a Hugging Face tokenizer's) without putting it on documents (GPT-2's) ends each
    example with it.

The loss counts an assistant turn from its first content token through the template's end of the
turn (`<|end|>\\n` above, `<|im_end|>` in ChatML), and a final EOS, so the model learns to stop.
Where a turn starts and ends in the text is where the template's rendering of the conversation up
to it (with the generation prompt) and through it end; in tokens it is where the tokens of that
text stop agreeing with the whole example's, so a token that straddles the boundary goes with the
text after it.
"""

import dataclasses
import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from bigflax.data import examples as examples_lib
from bigflax.errors import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@functools.cache
def _compiled(template: str) -> jinja2.Template:
  """A chat template compiled the way transformers compiles one (a sandbox: templates come from
  model repositories), with the helpers templates call."""
  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which chat templates do not want
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  environment.filters["tojson"] = tojson
  environment.globals["raise_exception"] = raise_exception
  environment.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
  return environment.from_string(template)


@dataclasses.dataclass(frozen=True)
class Example:
  """One example as read: a prompt and completion, or messages; and where it came from."""
  place: str
  prompt: str | None = None
  completion: str | None = None
  messages: tuple | None = None

  @classmethod
  def of(cls, record: examples_lib.Record) -> "Example":
    fields = record.fields
    if "messages" in fields:
      messages = examples_lib.field(record, "messages", (list,))
      for number, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
          raise DataError(f"{record.place}: message {number} is not an object with string "
                          "fields 'role' and 'content'")
      if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.place}: no message has role 'assistant', so there is nothing "
                        "to learn; give the answer as an assistant message")
      return cls(record.place, messages=tuple({"role": m["role"], "content": m["content"]}
                                              for m in messages))
    if "prompt" not in fields and "completion" not in fields:
      raise DataError(f"{record.place} has neither 'messages' nor 'prompt' and 'completion'; its "
                      f"fields are {sorted(fields)}")
    return cls(record.place, prompt=examples_lib.field(record, "prompt"),
               completion=examples_lib.field(record, "completion"))

  def conversation(self) -> list[dict]:
    if self.messages is not None:
      return [dict(m) for m in self.messages]
    return [{"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.completion}]


def render(example: Example, template: str, bos_token: str = "",
           eos_token: str = "") -> tuple[str, list[tuple[int, int]]]:
  """(the example's text through the chat `template`, the character spans the loss counts: each
  assistant turn's)."""
  messages = example.conversation()

  def rendered(upto: int, generation_prompt: bool) -> str:
    try:
      return _compiled(template).render(messages=messages[:upto], bos_token=bos_token or "",
                             eos_token=eos_token or "", add_generation_prompt=generation_prompt)
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f"{example.place}: the chat template fails on this conversation ({e}); "
                      "fix the example or the template") from None
  whole = rendered(len(messages), False)
  spans = []
  for number, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    start, end = rendered(number, True), rendered(number + 1, False)
    if not (whole.startswith(end) and end.startswith(start)):
      raise DataError(f"{example.place}: the chat template does not render this conversation "
                      "turn by turn (the text up to an assistant turn is no prefix of the "
                      "whole), so the answer tokens cannot be found; use a template that does")
    spans.append((len(start), len(end)))
  return whole, spans


def _agreeing(prefix: np.ndarray, tokens: np.ndarray) -> int:
  """How many leading tokens `prefix` and `tokens` share."""
  n = min(len(prefix), len(tokens))
  differ = np.flatnonzero(prefix[:n] != tokens[:n])
  return int(differ[0]) if len(differ) else n


def plain_text(example: Example) -> tuple[str, list[tuple[int, int]]]:
  """(the example's text for a tokenizer without a chat template, the spans the loss counts)."""
  if example.messages is not None:
    return render(example, DEFAULT_CHAT_TEMPLATE)
  text = example.prompt + example.completion
  return text, [(len(example.prompt), len(text))]


def encode(example: Example, tokenizer) -> np.ndarray:
  """The example's tokens and their loss weights, [2, n] int32 (see the module docstring)."""
  template = getattr(tokenizer, "chat_template", None)
  if template is not None:
    text, spans = render(example, template, getattr(tokenizer, "bos_token", ""),
                         getattr(tokenizer, "eos_token", ""))

    def tokenize(t):  # the template writes its special tokens itself
      return tokenizer.encode(t, example.place)
  else:
    text, spans = plain_text(example)
    eos = getattr(tokenizer, "eos_id", None)

    def tokenize(t):
      ids = tokenizer.encode_document(t.encode("utf-8"), example.place)
      return ids if eos is None or (len(ids) and ids[-1] == eos) else np.append(ids, eos)
  tokens = np.asarray(tokenize(text), np.int32)
  weights = np.zeros_like(tokens)
  for start, end in spans:
    first, last = (_agreeing(np.asarray(tokenize(text[:at])), tokens) for at in (start, end))
    weights[first:last] = 1
  return np.stack([tokens, weights])


class Examples:
  """A split's examples as read (a source's split; `load_corpus` tokenizes it, `tokenize`)."""

  def __init__(self, examples: list[Example]):
    self.examples = examples

  def __len__(self) -> int:
    return len(self.examples)

  def in_order(self) -> list[bytes]:
    """The examples' text without a tokenizer's chat template (what a char tokenizer is built
    from)."""
    return [plain_text(e)[0].encode("utf-8") for e in self.examples]

  def tokenize(self, tokenizer) -> "TokenizedExamples":
    return TokenizedExamples([encode(e, tokenizer) for e in self.examples])


class TokenizedExamples:
  """A split's examples as documents that carry loss weights (`packing`): tokenized once, kept in
  memory; the packed pipeline reads them like a token cache."""

  def __init__(self, documents: list[np.ndarray]):
    self._documents = documents

  def __len__(self) -> int:
    return len(self._documents)

  def token_lengths(self) -> np.ndarray:
    return np.array([d.shape[1] for d in self._documents], np.int64)

  def counted_targets(self) -> np.ndarray:
    """Each example's targets that the loss counts (weight 1, after its first token)."""
    return np.array([int(d[1, 1:].sum()) for d in self._documents], np.int64)

  def tokens(self, index: int) -> np.ndarray:
    return self._documents[index]


def open_splits(data_config) -> tuple[Examples, Examples, str]:
  """The `sft` source: (train examples, val examples, a description)."""
  train, val, description = examples_lib.open_splits(data_config)
  return (Examples([Example.of(r) for r in train]), Examples([Example.of(r) for r in val]),
          f"fine-tuning examples {description}")
