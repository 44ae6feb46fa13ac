# Two commands do all set-up (each installs what it needs, idempotently):
#   make run    ComfyUI + LoRA Loom + the playground, queues its example workflow, prints the address that opens it
#   make test   all test tiers (unit, bridge, e2e with the real server and headless Chromium)
PY := .loom/venv/bin/python
export PYTHONPATH := $(CURDIR)/dev

.PHONY: run test setup

setup:
	bash dev/bootstrap.sh

run:
	bash dev/bootstrap.sh
	$(PY) -m loomdev.run $(ARGS)

test:
	bash dev/bootstrap.sh --browser
	$(PY) -m pytest $(ARGS)
