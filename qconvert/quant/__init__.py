"""Pure numpy quantizers (no onnx imports): k-means palettes, linear grids, and the row layout they share."""
