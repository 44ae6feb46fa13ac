"""The one place that touches ComfyUI model objects: installs adapters and composition plans onto a *cloned*
ModelPatcher / CLIP (object patches, weight patches, transformer_options, wrappers). Nothing here assigns to a
ComfyUI module attribute; everything disappears with the clone."""
