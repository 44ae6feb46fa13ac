"""`python -m <pack folder>` from ComfyUI's custom_nodes (or `python path/to/pack/__main__.py`): the loom CLI."""

if __package__:
    from .cli import main
else:  # run as a file: load the pack under its fixed name so relative imports work
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.abspath(__file__))
    # Python put this folder first on sys.path, where the pack's nodes/ would shadow ComfyUI's top-level `nodes`.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.util.spec_from_file_location("lora_loom", os.path.join(_root, "__init__.py"),
                                                   submodule_search_locations=[_root])
    _pack = importlib.util.module_from_spec(_spec)
    sys.modules["lora_loom"] = _pack
    _spec.loader.exec_module(_pack)
    from lora_loom.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
