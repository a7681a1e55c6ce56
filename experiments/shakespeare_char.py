"""nanoGPT's CPU recipe for character-level Tiny Shakespeare (its README's "baby" CPU run).

    bigflax train --config experiments/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt

Target: val loss ≤ 1.88 after 2000 steps (nanoGPT reaches 1.88 with this recipe), measured over
200 batches of val windows. `python tools/reproduce.py experiments/shakespeare_char.py` runs it
and fails when the target is missed.
"""

from bigflax.config import base

TARGET_EVAL_LOSS = 1.88


def get_config():
  c = base()
  c.data.path = "../shared/data/tinyshakespeare.txt"
  c.data.tokenizer = "char"  # the 65 sorted distinct characters
  c.data.val_fraction = 0.1  # first 90% of characters train, last 10% validate
  c.data.batching = "windows"  # nanoGPT's random windows of the flat text
  c.steps = 2000
  c.batch_size = 12
  c.log_every = 50
  c.eval_every = 500
  c.eval_batches = 200
  c.model.block_size = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.dropout = 0.0
  c.model.use_bias = False
  c.model.mlp = "gelu"  # nanoGPT's nn.GELU(): exact, not the tanh approximation
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.1
  c.optimizer.weight_decay_exclude = ("bias", "scale")  # nanoGPT decays every 2-D weight
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = 2000
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.clip_norm = 1.0
  c.sample.prompt = "ROMEO:"
  c.sample.max_new_tokens = 300
  return c
