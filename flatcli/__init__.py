"""flatcli: flatness and sharpness of trained networks, and how they relate to generalization."""

__version__ = "0.1.0"
