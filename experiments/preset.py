"""A named architecture (bigflax/presets.py) on the default data and training settings.

    bigflax train --config experiments/preset.py:gpt2_124m --config.model.scan_layers=True
    bigflax train --config experiments/preset.py:llama2_7b --config.model.remat=full ...

The text after the colon picks the preset; the run is named after it. The large presets are for
planning (AOT compile, memory, FLOPs) on a pod slice, not for this CPU.
"""

from bigflax import presets
from bigflax.config import base


def get_config(name: str):
  c = base()
  c.name = name
  presets.apply(name, c)
  return c
