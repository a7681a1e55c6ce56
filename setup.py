from setuptools import find_packages, setup

# Compatible ranges, not pins: a library shares its environment with others. Each lower bound is
# the oldest release the test suite has passed with (Python 3.11, installed together), or the
# first with an API bigflax calls; upper bounds only where a release is known to break. The exact
# set CI tests lives in constraints.txt: pip install -e ".[test]" -c constraints.txt
setup(
    name="bigflax",
    version="0.1.0",
    description="Pretrain transformer language models with JAX/Flax, from a CPU to a TPU pod.",
    packages=find_packages(include=["bigflax", "bigflax.*"]),
    # jax 0.7.1, flax 0.12.0 and grain 0.2.17 (the lower bounds below) all need Python 3.11.
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7.1",  # jax.set_mesh
        "jaxlib>=0.7.1",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.22",  # Checkpointer.metadata(...).item_metadata
        "grain>=0.2.17",  # ThreadPrefetchDatasetIterator that takes a prefetch of 0
        "array-record>=0.8.1",
        # 4.9.9 and older cannot read dataset_info.json with protobuf 7 (FieldDescriptor.label).
        "tensorflow-datasets>=4.9.10",
        "sentencepiece>=0.2.0",
        # Hugging Face tokenizer.json (data.tokenizer=hf): GPT-2's, Llama's, any save_pretrained
        # one. 0.20 reads the tokenizer.json files transformers 5 writes.
        "tokenizers>=0.20.0",
        # Chat templates of fine-tuning examples (bigflax.data.sft), rendered like transformers;
        # 3.1.6 closes the sandbox escapes that make older ones unsafe for templates from the Hub.
        "jinja2>=3.1.6",
        "numpy>=1.26",
        "ml_collections>=1.0.0",
        "absl-py>=2.1.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6.2.2",  # writes the TensorBoard event files (no TensorFlow needed)
        "matplotlib>=3.8",
        "safetensors>=0.4.3",  # Hugging Face checkpoints (bigflax.interop), read without torch
        # Parquet / JSON-lines shards, local or remote (bigflax.data.shards); both came with
        # tensorflow-datasets already, now imported directly. zstd shards use pyarrow's codec.
        "pyarrow>=26.0.1",
        "fsspec>=2026.9.0",
    ],
    extras_require={
        # The TensorBoard app itself, to view the event files a run writes: tensorboard --logdir.
        "tensorboard": ["tensorboard>=2.20"],
        # libtpu lets `bigflax aot` compile for TPU topologies on any machine (and is what runs
        # TPUs on a TPU VM); jax[tpu] picks the libtpu release that matches the installed jax.
        "tpu": ["jax[tpu]>=0.7.1"],
        # EleutherAI's lm-evaluation-harness on bigflax models (bigflax.evaluation.harness, the
        # only module that imports it). 0.4.10 is the first with the generation helpers
        # (normalize_gen_kwargs, postprocess_generated_text) the backend shares with lm_eval's.
        "eval": ["lm_eval>=0.4.10"],
        # `bigflax sweep` (bigflax.sweep, the only module that imports it): 4.9 is the first with
        # RetryHeartbeatStaleTrialCallback, which re-queues the trials of a killed worker;
        # Optuna's fANOVA parameter importances (the sweep's plot) fit scikit-learn's forests.
        "sweep": ["optuna>=4.9", "scikit-learn>=1.9.1"],
        # config.metrics.wandb_project: Weights & Biases tracking (bigflax.rundir imports it only
        # when asked for); the oldest release the tests have passed with.
        "wandb": ["wandb>=0.31"],
        # The tests compile for a v5e slice, so they need libtpu too; torch and transformers
        # build the reference models of the HF parity tests, and lm_eval's own `hf` backend
        # (lm_eval[hf]: accelerate, peft) is the reference of the harness backend's. Install with
        # constraints.txt: its exact torch has a CPU wheel on the build machines, while an
        # unconstrained torch pulls several GB of CUDA wheels.
        "test": ["pytest>=8.0", "portpicker>=1.6.0", "jax[tpu]>=0.7.1", "torch>=2.13",
                 "transformers>=5.23", "lm_eval[hf]>=0.4.10",
                 "optuna>=4.9", "scikit-learn>=1.9.1", "wandb>=0.31",
                 # tests/test_notebook.py runs notebooks/quickstart.ipynb in a Python kernel and
                 # checks its jupytext pair (the releases it has passed with)
                 "nbclient>=0.11.0", "nbformat>=5.11.1", "ipykernel>=7.4.0", "jupytext>=1.19.6"],
    },
    entry_points={"console_scripts": ["bigflax=bigflax.cli:main"]},
)
