#!/usr/bin/env bash
# Prepare, on this (CPU) machine, the Python packages cirlab needs that the lent GPU machine's
# image lacks, as the folder .gpu_site/ that the device tool carries (carry: [".gpu_site"]):
#   .gpu_site/py/     pure-Python packages copied from .venv (hydra, omegaconf, antlr4, kornia,
#                     submitit, the submitit launcher plugin); they run on the GPU machine's Python 3.12
#   .gpu_site/wheels/ compiled ones downloaded for CPython 3.12 x86-64 (kornia_rs, which kornia imports)
# The GPU image already has torch, torchvision, lightning, torchmetrics, scikit-image, matplotlib,
# rich, pytest; torchcodec is not carried (cirlab's JPEG step falls back to torchvision.io's libjpeg
# codec, same output). The folder is git-ignored through .git/info/exclude. Usage:
#   scripts/gpu_site.sh          # then: device run with carry [".gpu_site"], command scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SITE=$(ls -d "$VENV"/lib/python3.*/site-packages | head -1)
grep -qxF '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
rm -rf .gpu_site && mkdir -p .gpu_site/py .gpu_site/wheels
for package in hydra omegaconf antlr4 kornia submitit hydra_plugins; do
    cp -r "$SITE/$package" .gpu_site/py/
done
find .gpu_site/py -name __pycache__ -prune -exec rm -rf {} +
KORNIA_RS=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('kornia_rs'))")
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu_site/wheels "kornia_rs==$KORNIA_RS"
du -sh .gpu_site
ls .gpu_site/py .gpu_site/wheels
