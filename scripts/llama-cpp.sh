# Sourced by the bench scripts: `llama_cpp_tool NAME` prints the path of llama.cpp's tool
# NAME (llama-bench, llama-server), building it once into target/llama.cpp from the
# vendored tree of the llama-cpp-python source distribution (needs cmake, which
# `pip install cmake` provides). No llama.cpp code enters the repository.
llama_cpp_tool() {
  local name=$1 bin=target/llama.cpp/build/bin/$1
  if [ ! -x "$bin" ]; then
    echo "building $name from the llama-cpp-python sdist (once, ~10 min on 2 cores)" >&2
    if [ ! -f target/llama.cpp/CMakeLists.txt ]; then
      local tmp
      tmp=$(mktemp -d)
      # Without build isolation: with it, pip builds the sdist's build requirements from
      # source too (--no-binary :all: applies to them); here that was still compiling
      # after seven minutes, before llama.cpp itself had started.
      python3 -m pip install -q scikit-build-core cmake >&2
      python3 -m pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d "$tmp" >&2
      tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
      mkdir -p target/llama.cpp && cp -r "$tmp"/llama_cpp_python-*/vendor/llama.cpp/. target/llama.cpp/
    fi
    cmake -S target/llama.cpp -B target/llama.cpp/build -DCMAKE_BUILD_TYPE=Release \
      $(llama_cpp_isa_flags) -DGGML_OPENMP=ON -DGGML_BLAS=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON >&2
    cmake --build target/llama.cpp/build -j"${THREADS:-$(nproc)}" --target "$name" >&2
  fi
  echo "$bin"
}

# ggml's instruction-set options: every extension this CPU lists, as `-march=native`
# would pick, except Intel's AMX tiles: the cloud VMs these benches run on list AMX but
# fault on its first instruction (`ldtilecfg`, SIGILL inside ggml's AMX matmul).
llama_cpp_isa_flags() {
  if ! grep -qw amx_tile /proc/cpuinfo; then
    echo -DGGML_NATIVE=ON
    return
  fi
  local flags=-DGGML_NATIVE=OFF has
  has() { grep -qw "$1" /proc/cpuinfo && echo "-D$2=ON"; }
  flags+=" $(has avx GGML_AVX) $(has avx2 GGML_AVX2) $(has fma GGML_FMA) $(has f16c GGML_F16C)"
  flags+=" $(has bmi2 GGML_BMI2) $(has avx_vnni GGML_AVX_VNNI) $(has avx512f GGML_AVX512)"
  flags+=" $(has avx512vbmi GGML_AVX512_VBMI) $(has avx512_vnni GGML_AVX512_VNNI)"
  flags+=" $(has avx512_bf16 GGML_AVX512_BF16)"
  echo "$flags"
}
