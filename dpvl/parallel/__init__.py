"""Parallelism: the device mesh, shardings, and how a batch is laid out over hosts."""
