"""One module per method; each turns a model and a plan into a Step (see common.py)."""
