"""Host adapters: frozen foundation models with a hook point (see `saelab.hosts.base`)."""
