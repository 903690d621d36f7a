"""mosc: a compiler toolchain for Mixture-of-Supernets Transformers."""
__version__ = "0.1.0"
