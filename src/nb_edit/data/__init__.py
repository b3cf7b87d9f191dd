"""Editing data: the record schema, datasets on disk, converters, curation, synthetic sets and
the real-photo benchmark. See data/README.md for the formats."""

from nb_edit.data.schema import SPLIT_SEED, SPLITS, EditRecord, RecordError, assign_split, validate_record
from nb_edit.data.store import EditDataset, convert_paired, read_dataset, write_dataset

__all__ = [
    "SPLITS", "SPLIT_SEED", "EditRecord", "RecordError", "assign_split", "validate_record",
    "EditDataset", "convert_paired", "read_dataset", "write_dataset",
]
