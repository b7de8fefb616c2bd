"""ruyiflow: serve familial early-exit and MoE language models across edge and cloud."""

__version__ = "0.1.0"
