#!/usr/bin/env bash
# Builds (once) and prints the path of a llama-cpp-python wheel that runs on this CPU.
#
# Why not a default build: a native build (-march=native) on a VM whose CPU advertises AMX but
# does not allow it dies at the first decode, and a build with AVX-512 dies with "illegal
# instruction" on CPUs without it. So the instruction sets are read from /proc/cpuinfo, AMX is
# always off, and the wheel is cached under a key made of the version and those flags: a later
# install on a machine of the same kind takes seconds.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
cache_root="${APPORTION_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apportion/wheels}"

flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]]; }

args=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)
key="cpu"
for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2; do
  flag=${pair%%:*}; opt=${pair##*:}
  if has "$flag"; then args+=("-DGGML_${opt}=ON"); key+="-$flag"; else args+=("-DGGML_${opt}=OFF"); fi
done
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
  args+=(-DGGML_AVX512=ON); key+="-avx512"
else
  args+=(-DGGML_AVX512=OFF)
fi

dir="$cache_root/$version/$key"
wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$wheel" ]]; then
  mkdir -p "$dir"
  echo "building llama-cpp-python $version for $key (about 6-10 minutes on 2 cores)" >&2
  CMAKE_ARGS="${args[*]}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$python" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$version" -w "$dir" >&2
  wheel=$(ls "$dir"/llama_cpp_python-"$version"-*.whl | head -n1)
fi
echo "$wheel"
