#!/usr/bin/env bash
# Installs the servers the object-storage tests start, if they are missing; safe to run again.
#
#   Azurite (Azure Blob Storage emulator): npm package pinned in tools/package.json and
#     tools/package-lock.json, installed into tools/node_modules (needs Node.js 20+ and npm).
#   Garage (S3-compatible store): built from crates.io with cargo install into the tool cache,
#     ${REPLICATOR_TOOLS:-~/.cache/replicator-tools}/garage-<version>/bin/garage.
#
# Prints what it did. Exits non-zero, saying why, if something cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

GARAGE_VERSION=2.5.0   # keep in step with testkit/src/garage.rs (GARAGE_VERSION)
tools_cache=${REPLICATOR_TOOLS:-$HOME/.cache/replicator-tools}
garage_root="$tools_cache/garage-$GARAGE_VERSION"
garage_bin="$garage_root/bin/garage"

say() { printf 'setup-tools: %s\n' "$*"; }
die() { printf 'setup-tools: error: %s\n' "$*" >&2; exit 1; }

# --- Azurite -------------------------------------------------------------------------------
azurite_bin=tools/node_modules/.bin/azurite-blob
if [[ -x "$azurite_bin" ]]; then
    say "Azurite already installed ($azurite_bin)"
else
    command -v node >/dev/null || die "node not found: install Node.js 20+ (Debian: apt-get install nodejs npm) to run Azurite"
    command -v npm >/dev/null || die "npm not found: install npm (Debian: apt-get install npm)"
    node_major=$(node -p 'process.versions.node.split(".")[0]')
    ((node_major >= 20)) || die "Node.js $(node --version) is too old for Azurite; install Node.js 20+"
    say "installing Azurite with npm ci --prefix tools (pinned in tools/package-lock.json)"
    npm ci --prefix tools --no-audit --no-fund --loglevel=error
    [[ -x "$azurite_bin" ]] || die "npm ci finished but $azurite_bin is missing"
    say "Azurite installed ($azurite_bin)"
fi

# --- Garage --------------------------------------------------------------------------------
if [[ -x "$garage_bin" ]] && "$garage_bin" --version 2>/dev/null | grep -qF "$GARAGE_VERSION"; then
    say "Garage $GARAGE_VERSION already installed ($garage_bin)"
else
    command -v cargo >/dev/null || die "cargo not found: install Rust stable with rustup (https://rustup.rs)"
    command -v cc >/dev/null || die "no C compiler: apt-get install gcc libc6-dev (Garage's build needs one)"
    say "building Garage $GARAGE_VERSION with cargo install into $garage_root"
    say "this takes about 30 minutes on 2 cores the first time; later runs reuse the binary"
    mkdir -p "$tools_cache"
    cargo install garage --version "$GARAGE_VERSION" --locked --root "$garage_root"
    [[ -x "$garage_bin" ]] || die "cargo install finished but $garage_bin is missing"
    say "Garage $GARAGE_VERSION installed ($garage_bin)"
fi
