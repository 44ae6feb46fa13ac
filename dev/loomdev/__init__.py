"""Development tooling for LoRA Loom (not shipped in the pack): workspace, fixtures, server control, run."""
