"""Models, SSL objectives, the DeepSpeed trainer, evaluators and the `cellssl` CLI. Imports loaders and kernels."""
