"""Calibration: layer-streamed activation statistics (importance matrix) and their file format."""
