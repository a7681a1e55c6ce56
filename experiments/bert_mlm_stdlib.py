"""BERT-style masked-LM pretraining of a small byte-level encoder on the Python standard library.

    bigflax train --config experiments/bert_mlm_stdlib.py
    bigflax train --config experiments/bert_mlm_stdlib.py:classify --config.data.path=LABELLED.jsonl \\
        --config.init_from=runs/bert_mlm_stdlib --workdir runs/bert_classify

The embedded default's model and data (4 layers × 128, block 128, the stdlib's .py files split by
file), made bidirectional (model.causal=False) and trained on BERT's objective (Devlin et al.
2019): 15% of the real tokens are chosen, 80% of those become [MASK] (id 256, the first past the
byte tokenizer's, reserved in the 384-id padded vocabulary), 10% a random byte, 10% stay; the loss
reads the chosen tokens only. `:classify` fine-tunes the encoder on a JSONL/CSV of {text, label}
with a head on the first token; experiments/transfer_stdlib.py measures what the pretraining is
worth.

Measured (seed 0, the 2-core CPU shared with other jobs, 18 min): the masked-token eval loss
falls 3.134 → 3.039 → 2.864 → 2.640 → 2.551 → 2.518 nats at steps 200 … 1200 (chance: ln 256 =
5.55), and 34.9% of the masked bytes are recovered exactly. Bits per byte are not reported: the
loss reads only the masked 15%.
"""

from bigflax.config import base


def get_config(variant: str = "pretrain"):
  c = base()
  c.name = f"bert_mlm_stdlib{'' if variant == 'pretrain' else '_' + variant}"
  c.model.causal = False
  if variant == "pretrain":
    c.objective = "mlm"
  elif variant == "classify":
    c.task = "classify"
    c.steps = c.optimizer.decay_steps = 300
    c.optimizer.learning_rate = 1e-3
    c.eval_batches = 0  # every val example
  else:
    raise ValueError(f"unknown variant {variant!r}; use bert_mlm_stdlib.py or :classify")
  return c
