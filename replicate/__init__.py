"""Reference replication of the CIFAR-10 experiments of He et al. 2015 (arXiv:1512.03385).

Modules: `models` (plain and residual nets), `data` (CIFAR-10 on the device), `train` (the
paper's protocol). Import them by name, e.g. `from replicate.train import Config, train`.
"""

__version__ = "0.1.0"
