"""Importers of published checkpoints from other code bases (PyTorch .pth files)."""
