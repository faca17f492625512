"""nemoq: faithful, fast GGUF files from NVIDIA Nemotron-H hybrid Mamba2/MoE checkpoints."""

__version__ = "0.1.0"
