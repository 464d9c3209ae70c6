"""Raw-input readers: text corpora (and the wiki-markup stripper), retrieval-based selection, Swiss-Prot
flat files, MovieLens interactions. Nothing here touches a model's activations."""
