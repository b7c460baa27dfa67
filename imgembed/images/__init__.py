"""Reading images: their bytes from a row, a file (under the allowed roots) or http(s), decoding
them with Pillow, and the one error an image can cause. No torch: the worker, analysis, training,
the benchmark and the examples all read images through here."""
