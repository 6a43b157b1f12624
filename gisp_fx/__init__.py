"""gisp-fx: structured pruning of Hugging Face causal LMs (GISP) as torch.export graph passes.

    import gisp_fx as gx
    loaded = gx.load_model("smollm2")
    result = gx.prune_(loaded.model, gx.GispConfig(sparsity=0.5), gx.lm_windows(loaded.tokenizer))

Importing the package stays light: the API (gisp_fx.api) loads on first use of one of its names.
"""

from gisp_fx.errors import GispError
from gisp_fx.version import __version__

API = ("CompileConfig", "GispConfig", "GroupPlan", "LoadedModel", "Method", "PgConfig", "PruneResult", "analyse",
       "custom_objective", "export_onnx", "lm_windows", "load_model", "materialize", "mc_sequences", "prune_",
       "save_pretrained")
__all__ = ["GispError", "__version__", *API]


def __getattr__(name: str):
    if name in API:
        from gisp_fx import api

        return getattr(api, name)
    raise AttributeError(f"module 'gisp_fx' has no attribute '{name}'")
