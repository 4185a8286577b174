"""bge: fine-tune BGE embedding models in plain PyTorch."""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from bge.config import TrainConfig
from bge.embedder import Embedder, load
from bge.errors import UserError
from bge.lstm import BiLSTMEncoder, LSTMConfig
from bge.model import Encoder, ModelConfig
from bge.tokenizer import QUERY_PROMPTS, Tokenizer
from bge.weights import load_model, save

__all__ = ["BiLSTMEncoder", "Embedder", "Encoder", "LSTMConfig", "ModelConfig", "QUERY_PROMPTS", "Tokenizer",
           "TrainConfig", "TrainResult", "UserError", "load", "load_model", "save", "train"]


def __getattr__(name: str):
    """`train` and `TrainResult` (bge.training) load on first use: the run's modules are not needed to encode."""
    if name in ("train", "TrainResult"):
        from bge import training

        return getattr(training, name)
    raise AttributeError(f"module 'bge' has no attribute {name!r}")
