"""The console's pages, one module per noun; each registers its routes (views/common.py)."""
