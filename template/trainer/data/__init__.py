"""Data: raw files (jsonl, csv, parquet) read and validated row by row (readers, records),
prepared into split, deduplicated training files with a quality report (dataset_preparator),
imported from elsewhere (data_import), and read back as token batches drawn by quality
weight (training_data, weighting)."""
