"""Activation sources (the data axis): LightningDataModules that declare `d_in` and yield [batch, d_in]."""
