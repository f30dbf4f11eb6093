"""Built-in megatron plugins, registered exactly as third-party plugins are."""
