"""Everything the paper does not need: demo audio, random codec, file index, codec cache, benchmarks, course kit, released checkpoints."""
