"""ctrl-ray: new conditional controls for pre-trained diffusion models with RL (CTRL)."""

__version__ = "0.1.0"
