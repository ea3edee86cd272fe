"""Bridges to other SAE libraries (each imports its library only in its own module): `sae_lens`."""
