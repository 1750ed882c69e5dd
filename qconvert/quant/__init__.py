"""Pure numpy quantizers (no onnx imports): k-means palettes and, later, linear grids."""
