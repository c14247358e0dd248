"""featsvm: pretrained CNN features + classical heads for ALL white-cell images."""

__version__ = "0.1.0"
