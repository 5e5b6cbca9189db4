"""Memory: measuring peaks, counting the encoder's tensors, and the planner that predicts what fits."""
