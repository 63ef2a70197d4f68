"""Data pipeline: corpora, tokenizer, token cache, packing and the Lightning DataModule."""

from data.datamodule import TextDataModule
from data.errors import DataError
from data.packing import PackedWindows
from data.sources import SOURCES, load_documents
from data.splits import SPLITS, split_documents
from data.tokenizer import Tokenizer, train_tokenizer
from data.tokens import TokenStore

__all__ = [
    "SOURCES",
    "SPLITS",
    "DataError",
    "PackedWindows",
    "TextDataModule",
    "TokenStore",
    "Tokenizer",
    "load_documents",
    "split_documents",
    "train_tokenizer",
]
