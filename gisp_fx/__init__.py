"""gisp-fx: structured pruning of Hugging Face causal LMs (GISP) as torch.export graph passes.

Importing the package stays light; the heavy modules load when their functions are called.
"""

from gisp_fx.errors import GispError

__version__ = "0.1.0"
__all__ = ["GispError", "load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":
        from gisp_fx.loading import load_model

        return load_model
    raise AttributeError(name)
