#!/usr/bin/env bash
# Set up lora2gguf in ./.venv: a portable llama-cpp-python wheel (built once, cached), torch CPU,
# the package with its reference/test extras, and llama.cpp's converters as test references.
# Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
LLAMA_CPP_PYTHON_VERSION=0.3.36
TORCH_VERSION=2.13.0
CACHE=${LORA2GGUF_CACHE:-$HOME/.cache/lora2gguf}
# A portable build: a native one compiles AMX code that dies with SIGILL on CPUs without it.
PORTABLE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
WHEEL_KEY=$(printf '%s %s' "$LLAMA_CPP_PYTHON_VERSION" "$PORTABLE_FLAGS" | sha256sum | cut -c1-12)
WHEELS=$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-$WHEEL_KEY
LOCAL_WHEELS=$ROOT/wheelhouse   # git-ignored; pip installs from here
SRC=$CACHE/src
REF=$CACHE/ref/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
PIP=("$VPY" -m pip --disable-pip-version-check -q)

mkdir -p "$SRC" "$WHEELS" "$LOCAL_WHEELS"
SDIST=$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz
if [ ! -f "$SDIST" ]; then
  say "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION source package"
  "${PIP[@]}" download --no-binary :all: --no-deps -d "$SRC" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "building a portable llama-cpp-python wheel (once; about 10 minutes on 2 cores)"
  CMAKE_ARGS="$PORTABLE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "${PIP[@]}" wheel --no-deps --no-cache-dir -w "$WHEELS.tmp" "$SDIST"
  mv "$WHEELS.tmp"/llama_cpp_python-*.whl "$WHEELS"/ && rmdir "$WHEELS.tmp"
fi
cp -u "$WHEELS"/llama_cpp_python-*.whl "$LOCAL_WHEELS"/

if [ ! -f "$REF/convert_hf_to_gguf.py" ] || [ ! -f "$REF/convert_lora_to_gguf.py" ]; then
  say "unpacking llama.cpp's converters (test references) from the source package"
  mkdir -p "$CACHE/ref"
  tar -xzf "$SDIST" -C "$CACHE/ref" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/convert_lora_to_gguf.py" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/gguf-py"
fi

say "installing packages into .venv"
# torch first, pinned: this version is a local CPU wheel; anything else downloads gigabytes
"${PIP[@]}" install "torch==$TORCH_VERSION"
"${PIP[@]}" install --find-links "$LOCAL_WHEELS" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
"${PIP[@]}" install --find-links "$LOCAL_WHEELS" -e ".[reference,test]" "torch==$TORCH_VERSION"

if [ "${1:-}" = "--with-browser" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing chromium (renders the HTML report in a test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || say "chromium could not be installed; the HTML rendering test will be skipped"
  fi
fi
"$VPY" -c "import llama_cpp, gguf, lora2gguf; print('lora2gguf', lora2gguf.__version__, '| llama-cpp-python', llama_cpp.__version__, '| gguf', gguf.__version__ if hasattr(gguf, '__version__') else '')" >&2
