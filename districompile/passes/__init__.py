"""The compiler passes, in order: capture, annotate, propagate, partition."""
