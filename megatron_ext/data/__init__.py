"""Data preparation: corpus reading, tokenizers and .bin/.idx preprocessing.

Submodules are imported on use so that ``import megatron_ext.data`` stays light.
"""
