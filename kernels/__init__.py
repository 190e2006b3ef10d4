"""This repository's own Triton kernels (optional: reached through fused_attention.py, which imports them on first use
and falls back to the chunked path where Triton is missing)."""
