"""Adapter library: index (SQLite), metadata readers, text and weight encoders, search. No ComfyUI imports
except in the one bridge module."""
