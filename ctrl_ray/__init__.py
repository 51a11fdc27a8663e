"""ctrl-ray: add new conditional controls to pre-trained diffusion models with RL (CTRL, arXiv 2406.12120)."""

__version__ = "0.1.0"
