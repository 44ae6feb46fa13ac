"""What the pack opens and writes, checked in one place (pure: os, json, struct; no torch, no ComfyUI).

* :mod:`.safetensors_header` — the one safetensors header validator (index, loader, CLI, learned gates).
* :mod:`.folders` — the one path-confinement check: a file is opened only if its real path lies inside the
  configured folders and its suffix is allowed.
* :mod:`.json_text` — JSON from untrusted text (headers, sidecars, workflow strings) with bounded nesting.
* :mod:`.writing` — files the CLI writes: never over an existing file (or its input) without ``force``,
  always through a temporary file renamed into place.
"""
