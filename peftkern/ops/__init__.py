"""torch.library custom ops of peftkern, one module per op family."""
