"""nanoGPT's GPU recipe for character-level Tiny Shakespeare ("baby GPT"), the speed benchmark shape.

    bigflax train --config experiments/shakespeare_char_baby.py
    python tools/bench.py --config experiments/shakespeare_char_baby.py

6 layers, 6 heads, 384 dims, block 256, batch 64, dropout 0.2, AdamW lr 1e-3, β2 0.99, warmup 100,
cosine to 1e-4 at step 5000. nanoGPT reaches val loss 1.4697 after 5000 steps on a GPU; at this
machine's ~1 step/s that is hours, so on a CPU it serves as the throughput benchmark (CPU-MFU).
"""

from bigflax.config import base

TARGET_EVAL_LOSS = 1.4697


def get_config():
  c = base()
  c.data.path = "../shared/data/tinyshakespeare.txt"
  c.data.tokenizer = "char"
  c.data.batching = "windows"  # nanoGPT samples random windows
  c.steps = 5000
  c.batch_size = 64
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 200
  c.model.block_size = 256
  c.model.num_layers = 6
  c.model.num_heads = 6
  c.model.embed_dim = 384
  c.model.dropout = 0.2
  c.model.use_bias = False
  c.model.mlp = "gelu"  # nanoGPT's nn.GELU(): exact, not the tanh approximation
  c.model.attention_chunk = 64  # skips the masked blocks: 1.08× faster on the CPU (tools/bench.py)
  c.optimizer.learning_rate = 1e-3
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 0.1
  c.optimizer.weight_decay_exclude = ("bias", "scale")  # nanoGPT decays every 2-D weight
  c.optimizer.warmup_steps = 100
  c.optimizer.decay_steps = 5000
  c.optimizer.end_learning_rate = 1e-4
  c.sample.prompt = "ROMEO:"
  c.sample.max_new_tokens = 300
  return c
