"""lorafit: fine-tune pretrained transformer encoders for text classification with LoRA under a budget.

    import lorafit
    run = lorafit.train("configs/minilm-lora.yaml")     # or a Config, a dict, or nothing for the default
    clf = lorafit.load(run.path)
    clf.predict(["Stocks rally as oil falls"])           # -> array(['Business'], dtype=object)
"""

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .errors import LorafitError  # noqa: E402


def train(config=None, **overrides):
    """Fine-tune, evaluate and save; return a Run (path, config, test_metrics). See lorafit.train.train."""
    from .train import train as _train

    return _train(config, **overrides)


def load(run_dir, **kwargs):
    """Load a completed run directory as a Classifier with predict / predict_proba."""
    from .predict import load as _load

    return _load(run_dir, **kwargs)


__all__ = ["Config", "LorafitError", "train", "load", "__version__"]
