"""Datasets as whole in-memory tensors (README "Datasets").

>>> from flatcli.data import load_dataset, subset, iter_batches
>>> ds = load_dataset("mnist5k")                     # doctest: +SKIP
>>> part = subset(ds.split("train"), 1000, seed=0)   # doctest: +SKIP
>>> for x, y in iter_batches(part.to("cuda"), 256):  # doctest: +SKIP
...     ...
"""

from flatcli.data.normalization import USUAL_STATS
from flatcli.data.registry import default_data_dir, list_datasets, load_dataset
from flatcli.data.splits import Dataset, Split, iter_batches, subset

__all__ = [
    # loading
    "load_dataset",
    "list_datasets",
    "default_data_dir",
    # in-memory form
    "Dataset",
    "Split",
    # walking a split
    "subset",
    "iter_batches",
    # normalisation
    "USUAL_STATS",
]
