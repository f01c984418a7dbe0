#!/usr/bin/env bash
# Install the carried wheel sets on a GPU machine (no internet there) and check each environment
# imports what its runs import, before any minute is spent training:
#   .whl-ours  -> /tmp/site        ours and the diffusers script (diffusers, datasets, pydantic, ...)
#   .whl-kohya -> /tmp/kohya-site  kohya's pins (accelerate 1.6, transformers 4.54, diffusers 0.32.1, ...)
#   .whl-cv    -> /tmp/kohya-site  only when carried: opencv 4.10 (kohya imports cv2; the machine's own
#                                  opencv-python-headless serves otherwise)
# Run from the repository root: bash bench/peers/setup.sh. Sets that were not carried are skipped.
# bench/peers/README.md gives the whole command lines.
set -euo pipefail
PY=${PYTHON:-python3}

install() {  # install TARGET WHEEL-FOLDER
  local wheels=("$2"/*.whl)
  [[ -e "${wheels[0]}" ]] || { echo "$2: not carried, skipped"; return 0; }
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-index --no-deps \
    --upgrade --target "$1" "${wheels[@]}"
  echo "$2 -> $1: ${#wheels[@]} wheels"
}

install /tmp/site .whl-ours
install /tmp/kohya-site .whl-kohya
install /tmp/kohya-site .whl-cv

if [[ -d .whl-ours ]]; then
  PYTHONPATH=/tmp/site "$PY" -c '
import importlib
names = ["torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "peft", "pydantic", "imagehash",
         "datasets", "pyarrow"]
print("ours:", ", ".join(f"{n} {importlib.import_module(n).__version__}" for n in names))
import lora.train, animelora.cli  # what `animelora train` imports
'
fi
if [[ -d .whl-kohya && -f .peers/sd-scripts/train_network.py ]]; then
  (cd .peers/sd-scripts && PYTHONPATH=/tmp/kohya-site "$PY" -c '
import importlib, importlib.util
import train_network, networks.lora  # its whole import chain, with its pinned packages first
names = ["torch", "diffusers", "transformers", "accelerate", "huggingface_hub", "tokenizers", "cv2", "numpy",
         "safetensors", "peft"]
found = {n: getattr(importlib.import_module(n), "__version__", "?") for n in names if importlib.util.find_spec(n)}
print("kohya:", ", ".join(f"{n} {v}" for n, v in found.items()))
')
fi
