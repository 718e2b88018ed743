"""Training callbacks: mask panels, throughput/MFU, ..."""
