#!/usr/bin/env bash
# Prints the torch version pyproject.toml pins for KIND (torch-cpu or torch-cuda): the one place
# that names the versions the project builds and tests against.
#   scripts/pinned_torch.sh torch-cpu   # -> 2.13.0
set -euo pipefail
kind="${1:?usage: pinned_torch.sh torch-cpu|torch-cuda}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="$(sed -n "s/^$kind = \"\(.*\)\"$/\1/p" "$root/pyproject.toml")"
[[ -n "$version" ]] || { echo "pinned_torch.sh: no $kind in pyproject.toml" >&2; exit 1; }
echo "$version"
