"""The per-token adapter runtime: wrapped layers (``layers``), the runtime and controller interface (``core``) and
the composition methods as controllers (``regional``, ``gated``, ``clora``). Pure torch; ``comfy_bridge/runtime.py``
installs a runtime on a cloned ModelPatcher."""
