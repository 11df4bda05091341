"""Task kinds beside generation: heads on the shared backbone, and the pure functions around them."""
