"""Training data: in-memory sources and deterministic device-resident batches."""

from fastdiff.data.batches import DeviceBatches
from fastdiff.data.sources import load_cifar10, load_digits, load_images

__all__ = ["DeviceBatches", "load_cifar10", "load_digits", "load_images"]
