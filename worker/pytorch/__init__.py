"""The PyTorch room of the worker: OpenCLIP and timm models, their towers and weights, their
preprocessing, and JPEG decoding on the model's device."""
