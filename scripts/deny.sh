#!/usr/bin/env bash
# License and ban checks of the dependency graph with cargo-deny (deny.toml):
# every crate's licence is on the allow list, rust-protobuf 2 enters only
# through raft 0.7 itself, duplicate versions warn. Offline: the index and
# sources come from `cargo fetch`, no advisory database is read.
# cargo-deny is installed once into $DWCP_CACHE/cargo-deny (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/dwcp/cargo-deny) and reused.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2
cache=${DWCP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dwcp}/cargo-deny
deny=$cache/bin/cargo-deny
if ! [ -x "$deny" ] || [ "$("$deny" --version)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
    echo "deny: installing cargo-deny $CARGO_DENY_VERSION into $cache" >&2
    cargo install cargo-deny --version "=$CARGO_DENY_VERSION" --locked --root "$cache" >&2
fi
cargo fetch --locked >&2
"$deny" --offline check licenses bans
