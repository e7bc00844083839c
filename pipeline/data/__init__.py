"""Training data, from the files users bring to the batches training sees.

- `sources`: read a local file (JSONL, JSON, Parquet, CSV) or a hub dataset into rows;
- `formats`: turn a row of a format (messages, sharegpt, alpaca, text) into one record;
- `pii`: find personal information and mask it or drop the example;
- `dedup`: exact and near-duplicate removal;
- `prepare`: the `data` stage, writing the prepared dataset and reports/data.{json,md};
- `tokenize`: records to token ids and loss masks, over-long policy, packing, batches.
"""
