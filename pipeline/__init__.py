"""dcd library: data, models, losses, knowledge cache, evaluation and runtime helpers."""
