"""One training loop on Megatron-Core, used for the seed LM and for every expert."""
