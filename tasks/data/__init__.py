"""Data sources by name, splitting, content hashing and loaders."""

from tasks.data.dataset import Dataset, load_dataset_file, save_dataset
from tasks.data.sources import SOURCES, build_dataset, register_source

__all__ = ["SOURCES", "Dataset", "build_dataset", "load_dataset_file", "register_source", "save_dataset"]
