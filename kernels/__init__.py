"""Triton kernels with torch references and dispatchers. Never imports engine or loaders."""
