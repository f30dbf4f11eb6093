"""Built-in logger plugins (TensorBoard, CSV), registered exactly as third-party plugins are."""
