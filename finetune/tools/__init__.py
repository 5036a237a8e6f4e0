"""After training: export a DeepSpeed checkpoint to HF format, predict on files, summarize a sweep."""
