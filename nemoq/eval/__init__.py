"""nemoq eval: perplexity, KL divergence against a base model and a CI gate, computed as
llama-perplexity computes them, through llama-cpp-python. No torch here (DESIGN.md)."""
