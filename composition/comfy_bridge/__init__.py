"""The one place that touches ComfyUI model objects: installs merged patches and the per-token runtime
(``runtime.py``) onto a *cloned* ModelPatcher / CLIP (object patches, weight patches, transformer_options, wrappers,
an attachment). Nothing here assigns to a ComfyUI module attribute; everything disappears with the clone."""
