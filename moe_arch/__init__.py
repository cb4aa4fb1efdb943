"""moe_arch: train hybrid Mixture-of-Experts language models and find out why a run is not learning."""

__version__ = "0.1.0"
