"""gmr-bench: train, evaluate and diagnose single-step adversarial training (GMR and baselines)."""
from .train import TrainConfig, train
from .evaluate import EvalConfig, evaluate
from .models import create_model
from .methods import register_method

__all__ = ["TrainConfig", "train", "EvalConfig", "evaluate", "create_model", "register_method"]
__version__ = "0.1.0"
