"""Pascal VOC XML datasets for megatron."""
