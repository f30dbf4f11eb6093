"""Core data handling: reading images and annotations, preprocessing, episodes."""
