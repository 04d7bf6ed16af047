#!/usr/bin/env bash
# Set everything up (idempotent) and run the built-in demo: the seed report's story end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/lora2gguf demo "$@"
