"""Block formats (numpy references), recipes and the quantize driver."""
