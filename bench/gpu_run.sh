#!/usr/bin/env bash
# What the GPU machine runs: bench/gpu_bench.py (or the GPU-relevant tests) with the packages it lacks.
#
# The device machine (Python 3.12, torch + CUDA, transformers, peft, triton, grpcio, accelerate,
# safetensors, tokenizers, pytest) has no network and lacks bitsandbytes, gguf,
# grpcio-health-checking and grpcio-reflection; its protobuf may predate the >= 7.35 our generated code
# needs. So the wheels travel with the working tree, in .whl/ (ignored by git through
# .git/info/exclude, so it must be named in the run tool's `carry`):
#
#   1. here, once (network, ~1 min):   bash bench/gpu_run.sh prepare
#        downloads CPython 3.12 manylinux x86_64 wheels of those packages (plus grpcio, which
#        grpcio-health-checking >= 1.85.1 needs, and pytest-timeout for the test ini) at the versions
#        in .venv's `pip freeze`, builds loraserve's own wheel, and copies the embedded model's
#        tokenizer files (the tests build their tiny models on it); prints the size of .whl (< 60 MiB).
#   2. on the device, through the run tool with carry [".whl"]:
#        bash bench/gpu_run.sh run [gpu_bench.py args]     # e.g. --shapes 1b   or   --skip-anchors
#        bash bench/gpu_run.sh test [pytest args]          # tests/lora and tests/engine on the GPU
#
# Device side: the wheels are installed with --no-deps into /tmp/site (nothing of the machine's own
# environment changes) and PYTHONPATH puts them first. loraserve itself is imported from the working
# tree (a symlink tree at /tmp/lssrc mirroring pyproject's package-dir), not from the wheel, so a
# wheel built at an older commit can never be what is measured; the log prints the path it came from.
# The benchmark's log goes to $OUT/gpu_bench.log and its JSON to $OUT/gpu_bench.json.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="$REPO/.whl"
cd "$REPO"

# Packages the device lacks (or may have too old), at the versions pinned in .venv.
CARRIED=(bitsandbytes gguf grpcio-health-checking grpcio-reflection protobuf grpcio pytest-timeout google-re2)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

prepare() {
    local venv_pip="$REPO/.venv/bin/pip"
    [ -x "$venv_pip" ] || { echo "prepare: $venv_pip is missing (run it where the project's .venv is)" >&2; exit 1; }
    mkdir -p "$REPO/.git/info"
    grep -qxF '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.whl/' >> "$REPO/.git/info/exclude"
    rm -rf "$WHL"
    mkdir -p "$WHL"
    local freeze pins=() name pin
    freeze="$("$venv_pip" freeze)"
    for name in "${CARRIED[@]}"; do
        pin="$(grep -i "^${name}==" <<<"$freeze" || true)"
        [ -n "$pin" ] || { echo "prepare: $name is not installed in .venv" >&2; exit 1; }
        pins+=("$pin")
    done
    local platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    echo "downloading: ${pins[*]}"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$WHL" "${pins[@]}"
    echo "building the loraserve wheel"
    "$venv_pip" wheel --quiet --no-deps -w "$WHL" "$REPO"
    # The embedded model's tokenizer (the tests' tiny models use it); its weights stay here: the GGUF
    # is ~94 MiB, over the carry limit, and tests/lora and tests/engine never load them.
    local embedded
    embedded="$("$REPO/.venv/bin/python" -c \
        'from loraserve.core.model.load import ensure_embedded_model; print(ensure_embedded_model())')"
    mkdir -p "$WHL/embedded-tokenizer"
    for f in tokenizer.json tokenizer_config.json config.json generation_config.json chat_template.jinja \
             special_tokens_map.json; do
        [ -f "$embedded/$f" ] && cp "$embedded/$f" "$WHL/embedded-tokenizer/"
    done
    ls -la "$WHL"
    local bytes
    bytes="$(du -sb "$WHL" | cut -f1)"
    echo ".whl: $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
    if [ "$bytes" -gt $((60 * 1024 * 1024)) ]; then
        echo "prepare: .whl is over 60 MiB; the run tool carries 64 MiB in all" >&2
        exit 1
    fi
}

device_env() {
    [ -d "$WHL" ] || { echo "no .whl/ here: run 'bash bench/gpu_run.sh prepare' first and carry [\".whl\"]" >&2; exit 1; }
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$WHL"/*.whl > /tmp/pip-install.log 2>&1; then
        cat /tmp/pip-install.log >&2
        echo "installing the carried wheels failed" >&2
        exit 1
    fi
    # loraserve from the working tree, laid out as pyproject's [tool.setuptools.package-dir] maps it.
    rm -rf /tmp/lssrc
    python3 - "$REPO" <<'EOF'
import os, sys, tomllib
repo = sys.argv[1]
with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
    dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
for pkg in sorted(dirs, key=lambda p: p.count(".")):  # parents first
    src, dst = os.path.join(repo, dirs[pkg]), os.path.join("/tmp/lssrc", *pkg.split("."))
    if pkg.count(".") == 0:  # the top package: link its entries, so sub-packages can be added beside them
        os.makedirs(dst)
        for entry in os.listdir(src):
            os.symlink(os.path.join(src, entry), os.path.join(dst, entry))
    else:
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(src, dst)
EOF
    export PYTHONPATH="/tmp/lssrc:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
    if python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "transformers", "bitsandbytes", "peft", "triton", "accelerate", "google.protobuf", "grpc"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except Exception as e:
        print(f"{m}: import failed: {type(e).__name__}: {e}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
import loraserve.server.engine.engine as engine
print("loraserve engine:", engine.__file__)
EOF
    then :; else echo "(the version check above failed; going on: the run reports what breaks)"; fi
    nvidia-smi || true
}

run() {
    device_env
    local out="${OUT:-/tmp}"
    mkdir -p "$out"
    set +e
    python3 "$REPO/bench/gpu_bench.py" --out "$out/gpu_bench.json" "$@" 2>&1 | tee "$out/gpu_bench.log"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

test_() {
    device_env
    # The tests' tiny models use the embedded model's tokenizer, which ensure_embedded_model() looks up
    # in the loraserve cache: put the carried tokenizer there with a placeholder for the weights, which
    # these tests never load (a test that did would fail loudly: the placeholder is not safetensors).
    export XDG_CACHE_HOME=/tmp/lscache
    local d="$XDG_CACHE_HOME/loraserve/models/SmolLM2-135M-Instruct"
    mkdir -p "$d"
    cp "$WHL"/embedded-tokenizer/* "$d/"
    echo "placeholder: only the tokenizer was carried to this machine" > "$d/model.safetensors"
    local out="${OUT:-/tmp}"
    local files=(tests/lora tests/engine)
    set +e
    python3 -m pytest -p no:cacheprovider -q -rs --junitxml "$out/gpu_tests.xml" "${files[@]}" "$@" 2>&1 \
        | tee "$out/gpu_tests.log"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    run) shift; run "$@" ;;
    test) shift; test_ "$@" ;;
    *) echo "usage: bash bench/gpu_run.sh prepare | run [gpu_bench.py args] | test [pytest args]" >&2; exit 2 ;;
esac
