#!/usr/bin/env bash
# Installs the pinned OpenCode release that the integration tests run against, once per machine.
#
# Usage: tests/install-opencode.sh [VERSION]   (default 1.18.33)
# The last line on stdout is the path of the opencode binary; everything else goes to stderr.
# Safe to run repeatedly and concurrently: the install is built in a temporary sibling directory and
# renamed into place, so a half-finished install is never mistaken for a finished one.
set -euo pipefail

version="${1:-1.18.33}"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/opencode-mattermost"
target="$cache/opencode-$version"
binary_path="node_modules/opencode-linux-x64/bin/opencode"

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *)
        echo "install-opencode: only Linux x86_64 is supported here (this is $(uname -s) $(uname -m));" \
            "install opencode-ai@$version yourself and set OPENCODE_BIN to its binary" >&2
        exit 1
        ;;
esac

# Even `opencode --version` creates directories under $HOME, so it runs with a throwaway one.
scratch="$(mktemp -d)"
staging=""
cleanup() {
    rm -rf "$scratch"
    if [[ -n "$staging" ]]; then rm -rf "$staging"; fi
}
trap cleanup EXIT

# A finished install is one whose binary runs and reports the pinned version.
installed() {
    local binary="$1/$binary_path"
    [[ -x "$binary" ]] || return 1
    local reported
    reported="$(HOME="$scratch" XDG_CONFIG_HOME="$scratch/config" XDG_DATA_HOME="$scratch/data" \
        XDG_STATE_HOME="$scratch/state" XDG_CACHE_HOME="$scratch/cache" \
        "$binary" --version 2>/dev/null)" || return 1
    [[ "$reported" == "$version" ]]
}

if installed "$target"; then
    echo "$target/$binary_path"
    exit 0
fi

if ! command -v npm >/dev/null 2>&1; then
    echo "install-opencode: npm not found; install Node.js (which provides npm), or install" \
        "opencode-ai@$version yourself and set OPENCODE_BIN to its binary" >&2
    exit 1
fi

mkdir -p "$cache"
staging="$(mktemp -d "$cache/.opencode-$version.partial.XXXXXX")"
chmod 755 "$staging"
echo "install-opencode: installing opencode-ai@$version into $target" >&2
if ! npm install --no-audit --no-fund --prefix "$staging" "opencode-ai@$version" >&2; then
    echo "install-opencode: npm install opencode-ai@$version failed (see npm's output above);" \
        "check the network and the npm registry settings, then run this again" >&2
    exit 1
fi
if ! installed "$staging"; then
    echo "install-opencode: npm finished, but $staging/$binary_path does not run or does not report" \
        "version $version; is this platform supported by opencode-ai?" >&2
    exit 1
fi

# Another run may have finished while npm was busy; its install is as good as ours.
if ! installed "$target"; then
    # A broken install at the target is moved aside first, so that the rename below can succeed.
    if [[ -e "$target" ]]; then
        broken="$(mktemp -d "$cache/.opencode-$version.broken.XXXXXX")"
        mv "$target" "$broken/" 2>/dev/null || true
        rm -rf "$broken"
    fi
    # rename(2) of a directory is atomic; it fails if another run has just put its install in place.
    if mv -T "$staging" "$target" 2>/dev/null; then
        staging=""
    elif ! installed "$target"; then
        echo "install-opencode: could not move the new install from $staging into $target" >&2
        exit 1
    fi
fi

echo "$target/$binary_path"
