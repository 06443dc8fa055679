"""Loaders for real data sets available offline, and batch iterators."""
from .datasets import (FASHION_MNIST_CLASSES, Dataset, DatasetNotFound, load_digits,
                       load_fashion_mnist, load_mnist, read_idx)
from .text import TextDataset, load_shakespeare
from .loader import batches, num_batches, sequential_text_batches, text_batches

__all__ = ["Dataset", "DatasetNotFound", "TextDataset", "load_digits", "load_mnist",
           "load_fashion_mnist", "load_shakespeare", "read_idx", "FASHION_MNIST_CLASSES",
           "batches", "num_batches", "text_batches", "sequential_text_batches"]
