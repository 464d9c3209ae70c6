"""Activation sources (the data axis): LightningDataModules that declare `d_in` and yield
{"acts": [batch, d_in], ...} batches through one shared stream (`stream.py`: resume position, rank
split, seeded order, input normalisation), over in-memory tables or the activation cache (`cache.py`)."""
