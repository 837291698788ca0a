"""Long Range Arena tasks (Tay et al., ICLR 2021): data generated or loaded, cached on disk."""
