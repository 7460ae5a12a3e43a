"""terarec.kernels."""
