#!/usr/bin/env bash
# vLLM for the GPU machines, which have no package registry and take 64 MiB a call:
#
#   bash benchmarks/vllm_bundle.sh             # here (needs PyPI): writes .vllm/vsite.tar.xz.part*
#   bash benchmarks/vllm_bundle.sh unpack DIR [PARTS]  # there: the parts into DIR
#
# There the parts are gathered over calls made while the machine stays warm: each call carries
# one part and copies it to PARTS (default .vllm), the last one unpacks.
#
# 1. vLLM 0.24.0, the release pinned to the GPU machines' torch 2.11.0, and what it needs that
#    the machines' image lacks (the image's list: the device tool's KINDS.md), resolved by pip
#    for CPython 3.12 on x86-64, without torch and its CUDA libraries and without the optional
#    kernel packages (flashinfer's cubins, tilelang, cutlass-dsl, ...), which a bf16 OPT or
#    Llama model on a Hopper GPU does not use. flashinfer-python itself comes along: vLLM's
#    model runner imports it at start (its kernels would be compiled on first use; FlashAttention
#    3 serves these models' attention).
# 2. Left out of vLLM's wheel: FlashAttention 2 (Hopper runs FlashAttention 3), the MoE and
#    FlashMLA kernels, the Rust front end, and DeepGEMM's and the SM100 attention's sources:
#    637 MB unpacked becomes about 290 MB. (vllm/third_party's pynvml stays: vLLM finds the GPU
#    with it.)
# 3. One folder, as pip --target lays it out, packed with xz and cut into 38 MiB parts, so that
#    each part travels beside the working tree in one call (.vllm is git-ignored).
set -euo pipefail

VERSION=0.24.0
PLATFORMS=(manylinux_2_5_x86_64 manylinux1_x86_64 manylinux2014_x86_64 manylinux_2_17_x86_64
           manylinux_2_24_x86_64 manylinux_2_26_x86_64 manylinux_2_27_x86_64
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64
           manylinux_2_35_x86_64)
# on the GPU machines' image already (or not needed): never bundled
ON_IMAGE="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle cuda-bindings cuda-pathfinder einops filelock frozenlist
fsspec grpcio h11 hf-xet httpcore httpx huggingface-hub jinja2 markdown-it-py markupsafe mdurl
mpmath multidict networkx ninja numpy opencv-python-headless packaging pillow
prometheus-client propcache protobuf psutil py-cpuinfo pygments pyyaml regex requests rich
safetensors sentencepiece setuptools shellingham six sympy tiktoken tokenizers torch
torchaudio torchvision tqdm transformers triton typer typing-extensions urllib3 uvloop yarl
nvidia-ml-py tabulate flashinfer-cubin cuda-tile tilelang"
# optional kernel packages of vLLM's requirements, unused here
OPTIONAL='^(torch|torchaudio|torchvision|flashinfer-cubin|tilelang|nvidia-cutlass-dsl|quack-kernels|tokenspeed-mla|humming-kernels|apache-tvm-ffi|fastsafetensors|nvidia-cudnn-frontend|numba|transformers|tokenizers|safetensors|numpy|opencv)'
DROP=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so
      vllm/_flashmla_C.abi3.so vllm/_flashmla_extension_C.abi3.so vllm/vllm-rs
      vllm/third_party/deep_gemm vllm/third_party/fmha_sm100)

if [[ "${1:-}" == unpack ]]; then
    dest=${2:?unpack DIR}
    parts=${3:-.vllm}
    mkdir -p "$dest"
    cat "$parts"/vsite.tar.xz.part* | python3 -c "
import sys, tarfile
tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall(sys.argv[1], filter='data')
" "$dest"
    exit
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

python3 -m pip download -q --no-deps "${platform_args[@]}" -d "$work/vllm" "vllm==$VERSION"
unzip -p "$work"/vllm/vllm-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' \
    | grep -v 'extra ==' | grep -Ev "$OPTIONAL" > "$work/requirements.txt"
# xgrammar's own need, which vLLM pins to an older release that xgrammar 0.2.8 cannot load
echo "apache-tvm-ffi==0.1.15.post2" >> "$work/requirements.txt"
python3 -m pip install -q --dry-run --ignore-installed --report "$work/report.json" \
    "${platform_args[@]}" --target "$work/resolve" -r "$work/requirements.txt"
python3 - "$work/report.json" "$ON_IMAGE" > "$work/urls.txt" <<'EOF'
import json, sys
on_image = set(sys.argv[2].split())
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if name not in on_image and not name.startswith("nvidia-"):
        print(item["download_info"]["url"])
EOF
mkdir -p "$work/wheels"
(cd "$work/wheels" && xargs -n 1 curl -sSfO < "$work/urls.txt")
python3 -m pip install -q --no-deps --no-compile --no-index "${platform_args[@]}" \
    --target "$work/site" "$work"/wheels/*.whl
(cd "$work/site" && unzip -q "$work"/vllm/vllm-*.whl && rm -rf "${DROP[@]}")
rm -rf .vllm && mkdir -p .vllm
tar cf - -C "$work/site" . | xz -T0 -6 | split -b 38M -d - .vllm/vsite.tar.xz.part
ls -l .vllm
