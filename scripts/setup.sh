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

# llama.cpp's own command-line tools, from the same source as the wheel, with the same portable
# flags: llama-imatrix (importance matrices) and llama-quantize (quantization with a matrix and
# per-tensor types). Static binaries, built once and cached like the wheel, copied into .venv/bin.
TOOLS_KEY=$(printf '%s %s tools' "$LLAMA_CPP_PYTHON_VERSION" "$PORTABLE_FLAGS" | sha256sum | cut -c1-12)
TOOLS=$CACHE/tools/llama.cpp-$LLAMA_CPP_PYTHON_VERSION-$TOOLS_KEY
TOOL_NAMES="llama-imatrix llama-quantize"
if [ ! -x "$TOOLS/bin/llama-imatrix" ] || [ ! -x "$TOOLS/bin/llama-quantize" ]; then
  say "building llama.cpp's llama-imatrix and llama-quantize (once; about 10 minutes on 2 cores)"
  TSRC=$CACHE/tools/src-$LLAMA_CPP_PYTHON_VERSION
  if [ ! -f "$TSRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$TSRC" && mkdir -p "$TSRC"
    tar -xzf "$SDIST" -C "$TSRC" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    # a submodule's .git pointer that leads nowhere outside llama-cpp-python's own checkout
    rm -f "$TSRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp/.git"
  fi
  rm -rf "$TOOLS.tmp"
  # shellcheck disable=SC2086
  cmake -S "$TSRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" -B "$TOOLS.tmp/build" \
    -DCMAKE_BUILD_TYPE=Release $PORTABLE_FLAGS -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION" \
    >"$CACHE/tools/build.log" 2>&1 || { tail -30 "$CACHE/tools/build.log" >&2; exit 1; }
  # shellcheck disable=SC2086
  cmake --build "$TOOLS.tmp/build" --config Release -j "$(nproc)" --target $TOOL_NAMES \
    >>"$CACHE/tools/build.log" 2>&1 || { tail -30 "$CACHE/tools/build.log" >&2; exit 1; }
  mkdir -p "$TOOLS.tmp/bin"
  for t in $TOOL_NAMES; do cp "$TOOLS.tmp/build/bin/$t" "$TOOLS.tmp/bin/"; done
  printf '{"source": "llama-cpp-python %s source package (vendor/llama.cpp)", "cmake_flags": "%s"}\n' \
    "$LLAMA_CPP_PYTHON_VERSION" "$PORTABLE_FLAGS -DBUILD_SHARED_LIBS=OFF" > "$TOOLS.tmp/bin/llama-tools.json"
  rm -rf "$TOOLS.tmp/build" "$TOOLS" && mv "$TOOLS.tmp" "$TOOLS"
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
for t in $TOOL_NAMES llama-tools.json; do cp -u "$TOOLS/bin/$t" .venv/bin/; done
"$VPY" -c "import llama_cpp, gguf, lora2gguf; print('lora2gguf', lora2gguf.__version__, '| llama-cpp-python', llama_cpp.__version__, '| gguf', gguf.__version__ if hasattr(gguf, '__version__') else '')" >&2
