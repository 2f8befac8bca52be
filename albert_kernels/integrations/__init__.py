"""Integrations with other libraries' plug points (transformers' attention interface)."""
from .hf_attention import register_hf_attention

__all__ = ["register_hf_attention"]
