#!/usr/bin/env bash
# Wheels for the packages benchmarks/gpu_check.sh needs that the GPU machines' image lacks,
# for its Python 3.12 on x86-64: grain (and array-record, portpicker), ml_collections and
# tensorboardX for phi4_jax's trainer; tokamax 0.0.17 and what it imports when its attention
# modules load (its wheel's Requires-Dist: einshape, qwix, pydantic, immutabledict, jaxtyping,
# tqdm, xprof; xprof's own fire, termcolor and six; tokamax imports xprof unconditionally).
# They are installed with --no-deps, so each one's needs are listed here. Checked by
# installing them into a Python 3.12 environment holding jax 0.11.2 and flax and importing
# tokamax's attention modules. Run where pip reaches PyPI, from the repository root; they land
# in ./.whl (git-ignored), which gpu_check.sh installs from. ~41 MB (xprof is 32 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 \
  tensorboardX==2.6.5 tokamax==0.0.17 einshape==1.0 qwix==0.1.8 typeguard==2.13.3 \
  immutabledict==4.3.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions==4.16.0 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
  tqdm==4.70.1 xprof==2.24.2 fire==0.7.1 termcolor==3.3.0 six==1.17.0
ls .whl
