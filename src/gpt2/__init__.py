"""gpt2: GPT-2 reproduced from scratch in PyTorch."""

from gpt2.config import GPTConfig, TrainConfig
from gpt2.errors import UserError
from gpt2.model import GPT

__all__ = ["GPT", "GPTConfig", "TrainConfig", "UserError"]
__version__ = "0.1.0"
