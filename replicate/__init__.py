"""Reference replication of the CIFAR-10 experiments of He et al. 2015 (arXiv:1512.03385)."""

from .models import build
from .train import Config, train

__all__ = ["build", "Config", "train"]
__version__ = "0.1.0"
