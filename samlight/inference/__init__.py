"""Inference: SamPredictor, the automatic mask generator, segmentation back into source formats."""
