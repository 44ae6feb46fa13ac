"""The math and data model of composing adapters on Flux. Imports torch/numpy only, never ComfyUI."""
