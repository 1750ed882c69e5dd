"""Quantizing for the layer's output, not its weights: input statistics from calibration data
(`statistics`), bias correction (`bias`), and measured checks of layers and whole models (`checks`)."""
