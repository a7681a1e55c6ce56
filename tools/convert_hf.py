"""Convert between a Hugging Face `transformers` model directory and a bigflax run directory.

    python tools/convert_hf.py to_bigflax HF_DIR WORKDIR [--scan_layers] [--param_dtype bfloat16]
    python tools/convert_hf.py to_hf WORKDIR HF_DIR

to_bigflax reads config.json and *.safetensors (GPT-2 or Llama; no torch needed) and writes
WORKDIR/config.json (bigflax's base config with the imported `model` fields) and WORKDIR/params
(Orbax), the layout `bigflax sample` and fine-tuning read. The checkpoint's tokenizer is not
converted: give the run a matching tokenizer before sampling text from it.
to_hf reads a finished run (WORKDIR/config.json + params) and writes config.json and
model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)` loads.
"""

import argparse
import pathlib
import sys

from bigflax import interop, rundir
from bigflax.config import base, validate
from bigflax.errors import UserError
from bigflax.model import ModelConfig


def to_bigflax(args) -> str:
  fields, params = interop.load_hf(args.source, param_dtype=args.param_dtype)
  config = base()
  config.name = f"hf_{fields['num_layers']}l_{fields['embed_dim']}d"
  config.model.update(fields, scan_layers=args.scan_layers)
  validate(config)
  params = interop.to_layout(params, ModelConfig.from_config(config.model))
  pathlib.Path(args.target).mkdir(parents=True, exist_ok=True)
  rundir.write_config(config, args.target)
  rundir.export_params(args.target, params)
  return f"wrote {args.target} (config.json, params/) from {args.source}"


def to_hf(args) -> str:
  _, model, params, _ = rundir.load_export(args.source)
  family = interop.save_hf(args.target, model.cfg, params)
  return f"wrote {args.target} ({family}: config.json, model.safetensors) from {args.source}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  hf_in = commands.add_parser("to_bigflax", help="transformers directory → bigflax run")
  hf_in.add_argument("source")
  hf_in.add_argument("target")
  hf_in.add_argument("--scan_layers", action="store_true", help="store params scanned")
  hf_in.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
  hf_out = commands.add_parser("to_hf", help="bigflax run → transformers directory")
  hf_out.add_argument("source")
  hf_out.add_argument("target")
  args = parser.parse_args(argv)
  try:
    print({"to_bigflax": to_bigflax, "to_hf": to_hf}[args.command](args))
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
