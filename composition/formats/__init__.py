"""One small converter per Flux LoRA file format -> canonical ComfyUI Flux module names (+ leftovers)."""
