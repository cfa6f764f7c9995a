"""Training layer: the steps both trainers run (and the bench times), the run loop helpers,
EMA, resilience and the checkpoint format."""
