# Two commands do all set-up (each installs what it needs, idempotently):
#   make run    ComfyUI + LoRA Loom + the playground, queues its example workflow, prints the address that opens it
#   make test   all test tiers (unit, bridge, e2e with the real server and headless Chromium)
#   make lint   ruff (configured in pyproject.toml) over the repository
# COMFYUI chooses the bundled ComfyUI runtime: `make test COMFYUI=0.33` (0.3.75 by default, or your own ComfyUI
# with COMFYUI_PATH=/path/to/ComfyUI when COMFYUI is not given).
export PYTHONPATH := $(CURDIR)/dev

ifeq ($(COMFYUI),)
LOOM := .loom
BOOTSTRAP := bash dev/bootstrap.sh
else
comfyui_version := $(patsubst 0.33,0.33.0,$(COMFYUI))
LOOM := .loom$(if $(filter-out 0.3.75,$(comfyui_version)),/comfyui-$(comfyui_version))
# The runtime is chosen by COMFYUI, not by a COMFYUI_PATH left in the environment; the tests and the server
# find it through COMFYUI_PATH.
BOOTSTRAP := COMFYUI_PATH= bash dev/bootstrap.sh --comfyui $(comfyui_version)
RUNTIME := COMFYUI_PATH=$(CURDIR)/$(LOOM)/comfyui
endif
PY := $(RUNTIME) $(LOOM)/venv/bin/python

.PHONY: run test setup lint

setup:
	$(BOOTSTRAP)

run:
	$(BOOTSTRAP)
	$(PY) -m loomdev.run $(ARGS)

test:
	$(BOOTSTRAP) --browser
	$(PY) -m pytest $(ARGS)

lint:
	$(BOOTSTRAP)
	$(PY) -m ruff check .
