"""The machinery of a training run, around the book's steps: the command line and its checks, the
output folder, checkpoints, metrics, the memory estimate, several ranks."""
