"""Meta-SGD for megatron."""
