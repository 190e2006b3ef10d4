"""Token data: FineWeb-Edu preparation into llm.c-format shards, and the training/validation loader.

Modules (each importable on its own; this package imports nothing so that tokenizer worker processes stay light):
  data.shards       the on-disk shard format (llm.c header + uint16 tokens), atomic writes, validation
  data.tokenizer    the GPT-2 tiktoken encoding, offline from verified local BPE files
  data.sources      document streams: the Hugging Face dataset, or local parquet / jsonl(.gz) / txt(.gz) files
  data.manifest     manifest.json: the format, the identity check and truncation a re-run starts from, the lock
  data.shard_writer ShardWriter: token stream -> shards of a fixed size, written in the background, recorded in order
  data.fineweb_edu  the preparation command (documents -> tokens -> shards + manifest.json), resumable
  data.permutation  the seeded, memory-free permutation that orders training windows
  data.loader       TokenLoader (training batches, exact resume) and ValidationSet (fixed token budget)
"""
