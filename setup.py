"""phi4_jax: the Phi-4 training recipe in JAX/Flax, from a laptop CPU to accelerator pods."""

from setuptools import find_packages, setup

# Python 3.11 (CI) keeps the pins the project was built on; Python >= 3.12 takes the current
# JAX (0.11.2 on the GPU machines), with which flax needs 0.12.10 (0.12.8 fails to import).
NEW_PYTHON = "python_version >= '3.12'"
OLD_PYTHON = "python_version < '3.12'"
CORE = [
    f"jax>=0.10.2,<0.11; {OLD_PYTHON}",
    f"jax>=0.11.2,<0.12; {NEW_PYTHON}",
    f"flax>=0.12.8,<0.13; {OLD_PYTHON}",
    f"flax>=0.12.10,<0.13; {NEW_PYTHON}",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tiktoken>=0.14,<0.15",
    "ml_collections>=1.1,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "safetensors>=0.8,<0.9",
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
]

setup(
    name="phi4_jax",
    version="0.1.0",
    description="The Phi-4 training recipe (pretraining to PTS-DPO) in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["phi4_jax", "phi4_jax.*"]),
    package_data={"phi4_jax": ["assets/*.tiktoken", "assets/SHA256SUMS"]},
    include_package_data=True,
    install_requires=CORE,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        # Only for interop checks against the reference implementation (accelerate: lm-eval's
        # Hugging Face backend, the reference of the `phi4_jax` lm-eval backend's test).
        "hf": ["torch>=2.4", "transformers>=5,<6", "accelerate>=0.26"],
        # `python -m phi4_jax.evaluate`: lm-evaluation-harness tasks on phi4_jax's own model.
        "eval": ["lm-eval>=0.4.8,<0.5"],
        # Only for benchmarks/plot_run.py (a run's loss curves as a PNG) and recipe_toy.py --plot.
        "plot": ["matplotlib>=3.7"],
        "gpu": [f"jax[cuda12]>=0.10.2,<0.11; {OLD_PYTHON}",
                f"jax[cuda13]>=0.11.2,<0.12; {NEW_PYTHON}",
                # The optional `tokamax` attention kernel (model.attention_impl=tokamax).
                f"tokamax>=0.0.17; {NEW_PYTHON}"],
        "tpu": [f"jax[tpu]>=0.10.2,<0.11; {OLD_PYTHON}", f"jax[tpu]>=0.11.2,<0.12; {NEW_PYTHON}"],
    },
)
