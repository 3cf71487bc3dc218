"""`train.py --compile` (opt-in, a speed-up beside the paper): torch.compile on the network, not on the mask bookkeeping.

The encoder, decoder and head read no tensor value, so they compile into whole graphs; the forward
around them reads the masks on the CPU (model.gather_visible), which would break a compiled graph
there. Compiled in place, the checkpoint keys stay. Each part compiles twice at most: for dense
micro-batches and for padded ones (docs/GPU.md; extras/tests/test_gpu_path.py counts the graphs).
"""


def compile_network(model, **options):
    """torch.compile(**options) the encoder, decoder and head of an EnCodecMAE, in place -> the model."""
    for part in (model.encoder, model.decoder, model.head):
        part.compile(**options)
    return model
