"""The most a float32 runtime can give on this machine's CPU: the rate of a large float32 matrix
product on PyTorch and on ONNX Runtime (the faster is the ceiling), and the work one image takes in
a model's image tower. A vision transformer spends nearly all its time in matrix products, so its
images/s cannot pass ``ceiling / flops per image``, whatever runtime runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

SIDE = 2048  # rows, columns and depth of the product: large enough to reach the kernels' best rate


def _rate(multiply: Callable[[], Any], seconds: float) -> float:
    """GFLOP/s of ``multiply`` (one SIDE x SIDE x SIDE product), run for at least ``seconds``."""
    multiply()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        multiply()
        runs += 1
    return runs * 2 * SIDE**3 / (time.perf_counter() - started) / 1e9


def _torch_product(threads: int) -> Callable[[], Any]:
    import torch

    torch.set_num_threads(threads)
    left, right = torch.randn(SIDE, SIDE), torch.randn(SIDE, SIDE)
    return lambda: torch.mm(left, right)


def _onnx_product(threads: int) -> Callable[[], Any]:
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    right = numpy_helper.from_array(np.random.default_rng(0).standard_normal((SIDE, SIDE), dtype=np.float32), "right")
    graph = helper.make_graph([helper.make_node("MatMul", ["left", "right"], ["product"])], "product",
                              [helper.make_tensor_value_info("left", TensorProto.FLOAT, [SIDE, SIDE])],
                              [helper.make_tensor_value_info("product", TensorProto.FLOAT, [SIDE, SIDE])], [right])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    left = np.random.default_rng(1).standard_normal((SIDE, SIDE), dtype=np.float32)
    return lambda: session.run(None, {"left": left})


def matrix_product_rates(threads: int, rounds: int = 3, seconds: float = 2.0) -> dict[str, float]:
    """GFLOP/s of a float32 SIDE-cubed matrix product on each runtime, with ``threads`` threads: the
    best of ``rounds`` runs of each in turn (a shared machine's speed drifts; a ceiling is a best)."""
    products = {"torch": _torch_product(threads), "onnx": _onnx_product(threads)}
    rates: dict[str, float] = {name: 0.0 for name in products}
    for _ in range(rounds):
        for name, multiply in products.items():
            rates[name] = max(rates[name], _rate(multiply, seconds))
    return rates


def flops_per_image(module: Any, input_size: int) -> float:
    """Floating-point operations of one image through ``module.encode_image`` (PyTorch's counter;
    its fused attention path is turned off meanwhile, since the counter does not see inside it)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module.encode_image(torch.zeros(2, 3, input_size, input_size))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / 2
