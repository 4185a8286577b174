"""bge: fine-tune BGE embedding models in plain PyTorch."""
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from bge.embedder import Embedder, load
from bge.errors import UserError
from bge.lstm import BiLSTMEncoder, LSTMConfig
from bge.model import Encoder, ModelConfig
from bge.tokenizer import QUERY_PROMPTS, Tokenizer
from bge.weights import load_model, save

__all__ = ["BiLSTMEncoder", "Embedder", "Encoder", "LSTMConfig", "ModelConfig", "QUERY_PROMPTS", "Tokenizer",
           "UserError", "load", "load_model", "save"]
