"""SAM building blocks: image encoder (timm), prompt encoder, mask decoder, two-way transformer."""
