"""adpredict: online click-through-rate prediction for real-time bidding, on CPU."""

__version__ = "0.1.0"
