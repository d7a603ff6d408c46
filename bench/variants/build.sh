#!/usr/bin/env bash
# Builds a variant of the eBPF programs for `vpc-ebpf-bench dataplane --object` and
# `vpc-ebpf-bench progcost --object`: the committed programs with one patch of this
# directory applied, in a throwaway worktree, so the checkout is never touched.
#
#   bench/variants/build.sh redirect-only /tmp/redirect-only.o
#
# The variants strip `from_pod` down for pod-to-pod traffic, to measure what the veth
# device model costs with (next to) no program at all; they are not a dataplane.
set -euo pipefail
name=${1:?usage: build.sh VARIANT OUT.o (VARIANT: a .patch name in bench/variants)}
out=${2:?usage: build.sh VARIANT OUT.o}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
patch="$here/$name.patch"
[ -f "$patch" ] || { echo "no variant $name: $patch does not exist" >&2; exit 2; }
tree=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git -C "$repo" worktree add --quiet --detach "$tree" HEAD
git -C "$tree" apply "$patch"
target=${CARGO_TARGET_DIR:-$HOME/.cache/vpc-ebpf/target}/ebpf-variants
(
    cd "$tree/ebpf/programs"
    CARGO_ENCODED_RUSTFLAGS=$(printf '%s\x1f%s\x1f%s\x1f%s' -C debuginfo=2 -C link-arg=--btf) \
        cargo +nightly build --quiet --release --target bpfel-unknown-none \
        -Z build-std=core --target-dir "$target"
)
cp "$target/bpfel-unknown-none/release/vpc-ebpf" "$out"
echo "built $out ($name on $(git -C "$repo" rev-parse --short HEAD))"
