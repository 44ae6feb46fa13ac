"""Pure-torch reference kernels (+ optional Triton): masked multi-LoRA linear, region-grouped joint attention,
attention-map probes. Imports torch only."""
