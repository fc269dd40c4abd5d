"""lorafit: fine-tune pretrained transformer encoders for text classification with LoRA under a budget.

    import lorafit
    run = lorafit.train("configs/minilm-lora.yaml")     # or a Config, a dict, or nothing for the default
    clf = lorafit.load(run.path)
    clf.predict(["Stocks rally as oil falls"])           # -> array(['Business'], dtype=object)
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import LorafitError  # noqa: E402


# Imported eagerly: binding the functions here keeps `lorafit.train` the function, not the submodule of
# the same name that Python would otherwise set as an attribute on first import.
from .predict import Classifier, load  # noqa: E402
from .search import search  # noqa: E402
import importlib  # noqa: E402

# the distill submodule first: a later first import would rebind `lorafit.distill` from the function to it
importlib.import_module(f"{__name__}.distill")
from .recipe import Run  # noqa: E402
from .train import distill, train  # noqa: E402

__all__ = ["Classifier", "Config", "LorafitError", "Run", "distill", "load", "search", "train", "__version__"]
