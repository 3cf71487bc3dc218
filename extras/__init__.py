"""Everything a reader of the paper's sections 2-3 does not need: demo audio, random codec, file index, codec
cache, benchmarks, course kit, released checkpoints. Each file says in its first line what it serves."""
