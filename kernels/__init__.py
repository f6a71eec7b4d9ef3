"""Fused ops for HyperDAS (Triton on CUDA, the PyTorch reference elsewhere). Imports nothing of hyperdas.

The drop-in modules are re-exported here; their functional forms are in hyperdas.kernels.modules
(``interchange``, ``fused_selection_head``, ``normalized_cross_attention``), since ``hyperdas.kernels.interchange``
names the op's own file. Every op takes ``use_triton: bool | None`` (hyperdas.kernels.common). The pyvene
intervention lives in hyperdas.kernels.pyvene_intervention (it needs pyvene, so it is not imported here).
"""

if __name__ == "kernels":
    # This folder was found as top-level `kernels` because the checkout's root is on sys.path (`python -m ...`
    # run there). That name is the Hugging Face package transformers (>= 5.25 depends on it) imports; a module
    # may replace itself in sys.modules while it loads, so the import gets that package, or fails as without us.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from hyperdas.kernels.common import KernelUnavailableError
    from hyperdas.kernels.modules import FusedSelectionHead, Interchange, NormalizedCrossAttention

    __all__ = ["FusedSelectionHead", "Interchange", "KernelUnavailableError", "NormalizedCrossAttention"]
