"""attnbench's Hydra launcher plugin: one GPU per job (``hydra/launcher=gpu_pool``)."""
