"""``loom bench perf``: per-step time and peak memory of composing Flux LoRAs, side by side with what users would
otherwise do (merged LoRAs, ComfyUI hook LoRAs, dense per-head masked attention, LoRA Composite), every ratio read
against the FLOP limit from :mod:`lora_loom.bench.flops`. Only :mod:`.flops`, :mod:`.report` and :mod:`.plot` are
pure; :mod:`.perf` and :mod:`.baselines` import ComfyUI."""
