"""Associated Learning (Kao & Chen, Neural Computation 2021) in plain PyTorch.

Start with `al.run.train(...)`, `al.run.evaluate(...)` and `al.checkpoint.load_model(...)`;
the four modules of a component and their local losses are in `al.model`, the training
loop in `al.trainer`.
"""

__version__ = "0.1.0"
