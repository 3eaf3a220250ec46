#!/usr/bin/env bash
# Build the Debian package of keyfence with cargo-deb:
#   scripts/package.sh [--no-build] [PROFILE]
# PROFILE is the Cargo profile whose keyfence binary is packaged (default
# release). The manual pages and completions are written by that binary
# (`keyfence man`, `keyfence completions`) into dist/generated/, which
# crates/keyfence/Cargo.toml lists as assets. Prints the .deb's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
if [ "${1:-}" = "--no-build" ]; then
    build=0
    shift
fi
profile="${1:-release}"
dir="$profile"
[ "$profile" = dev ] && dir=debug
bin="${CARGO_TARGET_DIR:-target}/$dir/keyfence"

if ! cargo deb --version >/dev/null 2>&1; then
    echo "cargo-deb is missing: cargo install cargo-deb --locked (scripts/install-deps.sh does)" >&2
    exit 1
fi
[ "$build" = 1 ] && cargo build --profile "$profile" --bin keyfence
[ -x "$bin" ] || { echo "no $bin: build it or drop --no-build" >&2; exit 1; }

gen=dist/generated
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$bin" man "$gen/man" >/dev/null
"$bin" completions bash >"$gen/completions/keyfence.bash"
"$bin" completions zsh >"$gen/completions/_keyfence"
"$bin" completions fish >"$gen/completions/keyfence.fish"

# --fast: the package is 100 MB uncompressed (debug line tables); CI only
# lists and unpacks it.
out=$(cargo deb -p keyfence --no-build --profile "$profile" ${KEYFENCE_DEB_FAST:+--fast} 2>&1) || {
    echo "$out" >&2
    exit 1
}
echo "$out" | grep -v '\.deb$' >&2 || true
echo "$out" | tail -n 1
